"""Cost of one test image's test-time training of the RAda head: ours against TPT's loop.

Both sides start from the same encoded views (the original and 63 random views, D=512) and the
same class text features, adapt the head for STEPS steps with AdamW, predict the original and
reset. The image encoder is left out: it is frozen and encodes the views once on both sides.

- ours: `trainers.model.ttt.TestTimeAdapter`. The 64 views are ranked by entropy without autograd;
  only the 10% kept (6) go through the head again with a graph, so the backward pass covers 6
  views.
- TPT's loop, written out as TPT applies it to its learnable prompt: every step classifies all
  64 views with a graph, keeps the 10% with the lowest entropy (chosen at the first step) and
  backpropagates the entropy of their averaged prediction through the graph of all 64.

Each measurement runs in a fresh process (see bench/head.py for the memory meter).

    python bench/ttt.py                 # CPU, float32
    python bench/ttt.py --device cuda
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.head import PeakMeter, median_seconds  # noqa: E402


def build_classifier(classes, dim, heads, device):
    """A CLIPClassifier with the RAda head, a frozen CLIP of embedding width `dim` (its towers
    are minimal: they are not run) and one hand-crafted prompt per class."""
    import torch
    from clip.model import CLIP

    from trainers.model.classifier import CLIPClassifier
    from trainers.model.prompts import FixedPrompts
    from trainers.model.rada_head import RAdaHead

    clip_model = CLIP(embed_dim=dim, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                      transformer_layers=1)
    head = RAdaHead(dim, num_heads=heads)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, dim**-0.5)
    classifier = CLIPClassifier(clip_model, FixedPrompts([f"class {i}" for i in range(classes)], "a photo of a {}."),
                                head=head).to(device)
    classifier.requires_grad_(False)
    head.requires_grad_(True)
    return classifier


def tpt_loop(classifier, optimizer, image_features, steps, fraction):
    """TPT's test_time_tuning with the head as the adapted module, then the prediction and reset."""
    import torch

    from trainers.model.ttt import marginal_entropy, num_confident, view_entropy

    initial = [p.detach().clone() for p in classifier.head.parameters()]
    state = optimizer.state_dict()
    with torch.no_grad():
        text_features = classifier.text_features()
    kept = None
    for _ in range(steps):
        logits = classifier.classify(image_features, text_features).logits
        if kept is None:  # chosen at the first step and kept for the others, as TPT does
            kept = torch.argsort(view_entropy(logits.detach()))[: num_confident(len(logits), fraction)]
        loss = marginal_entropy(logits[kept])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        prediction = classifier.classify(image_features[:1], text_features).logits
        for param, value in zip(classifier.head.parameters(), initial, strict=True):
            param.copy_(value)
    optimizer.load_state_dict(state)
    return prediction


def worker(args):
    import torch
    from torch.nn import functional as F

    from trainers.model.ttt import TestTimeAdapter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    classifier = build_classifier(args.classes, args.dim, args.heads, device)
    optimizer = torch.optim.AdamW(classifier.head.parameters(), lr=5e-3)
    image_features = F.normalize(torch.randn(1 + args.views, args.dim, device=device), dim=-1)
    with torch.no_grad():
        classifier.text_features()  # encoded once and cached on both sides

    if args.impl == "ours":
        adapter = TestTimeAdapter(classifier, [optimizer], steps=args.steps, confident_fraction=args.fraction)

        def one_image():
            try:
                adapter.adapt(image_features)
                return adapter.predict(image_features[:1])
            finally:
                adapter.reset()
    else:
        def one_image():
            return tpt_loop(classifier, optimizer, image_features, args.steps, args.fraction)

    meter = PeakMeter(args.device)
    meter.reset()
    prediction = one_image()
    extra = meter.extra()
    seconds = median_seconds(one_image, args.repeats, args.device)
    print(json.dumps({"seconds": seconds, "extra_bytes": extra,
                      "prediction": prediction.float().flatten().tolist()}))


def measure(args, impl, classes, steps):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", impl, "--classes", str(classes),
        "--steps", str(steps), "--views", str(args.views), "--fraction", str(args.fraction),
        "--dim", str(args.dim), "--heads", str(args.heads), "--device", args.device,
        "--threads", str(args.threads), "--repeats", str(args.repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes-list", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps-list", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--views", type=int, default=63)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["ours", "tpt"], help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        return worker(args)

    from tabulate import tabulate

    print(f"Test-time training of the RAda head, one image: 1 + {args.views} views, {args.fraction:.0%} kept, "
          f"D={args.dim}, {args.heads} heads, AdamW, {args.device}, {args.threads} threads")
    rows = []
    for classes in args.classes_list:
        for steps in args.steps_list:
            ours, tpt = measure(args, "ours", classes, steps), measure(args, "tpt", classes, steps)
            if "error" in ours or "error" in tpt:
                rows.append([classes, steps, ours.get("error", ""), tpt.get("error", ""), "", "", "", "", ""])
                continue
            # The same views, weights and optimiser: both must predict the same logits.
            gap = max(abs(a - b) for a, b in zip(ours["prediction"], tpt["prediction"], strict=True))
            rows.append([
                classes, steps,
                f"{ours['seconds'] * 1e3:.1f}", f"{tpt['seconds'] * 1e3:.1f}",
                f"{tpt['seconds'] / ours['seconds']:.2f}x",
                f"{ours['extra_bytes'] / 2**20:.0f}", f"{tpt['extra_bytes'] / 2**20:.0f}",
                f"{tpt['extra_bytes'] / max(ours['extra_bytes'], 1):.1f}x",
                f"{gap:.1e}",
            ])
    print(tabulate(rows, headers=["K", "steps", "ours ms", "TPT loop ms", "speed-up", "ours MiB", "TPT loop MiB",
                                  "memory ratio", "max logit gap"], tablefmt="github"))


if __name__ == "__main__":
    main()
