"""Cost of CoCoOp's per-image class features: the RAda head on them, and a training step.

Two parts, each side of each measurement in a fresh process on the same inputs and weights (the
memory meter and timing of bench/head.py: one untimed step for the peak memory, then the median
of --repeats timed steps; sides alternate within each of --rounds rounds, the order reversed every
round, so that load from other processes hits every side alike):

- head: RAdaCoCoOp's head on per-image text features (B, K, D), ours (`RAdaHead`, its `auto`
  attention) against the method spec written out literally (`tests/dense_rada.py`, which builds
  every K x K attention matrix of every image), at each K of --classes-list and B of
  --batch-list. The dense side is skipped where its estimated memory exceeds 80% of what the
  device has free (the table says so).
- step: one training step (forward, cross-entropy, backward, SGD step) of CoOp, CoCoOp and
  RAdaCoCoOp on the same random CLIP (--clip tiny: the tests' CLIP; small: 4-layer encoders of
  width 256), models built through trainers/model/compositions.py as the trainers build them,
  context "a photo of a" on both sides. CoOp encodes K prompts per step, CoCoOp B x K; the ratio
  column is the step time against CoOp's at the same batch.

    python bench/cocoop.py                             # both parts, CPU, float32, forward of the head
    python bench/cocoop.py --parts head --backward     # the head's forward + backward
    python bench/cocoop.py --parts step --clip small --step-batches 1 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.head import PeakMeter, timings  # noqa: E402

STEP_METHODS = ("CoOp", "CoCoOp", "RAdaCoCoOp")
# Sizes of the step's CLIP: the tests' tiny one, and a small one whose text tower does some work.
CLIP_SIZES = {
    "tiny": None,
    "small": {"embed_dim": 256, "image_resolution": 224, "vision_layers": 4, "vision_width": 256,
              "vision_patch_size": 32, "context_length": 77, "vocab_size": 49408, "transformer_width": 256,
              "transformer_heads": 4, "transformer_layers": 4},
}
# The dense head's peak, in K x K attention matrices of B x H x K x K floats (measured at B=32,
# K=1000: 5.3 GB forward, 7.7 GB forward + backward in bench/README.md), with some margin.
DENSE_MATRICES = {False: 6, True: 9}


def dense_bytes_estimate(batch, classes, heads, element_size, backward):
    return DENSE_MATRICES[backward] * batch * heads * classes * classes * element_size


def free_bytes(device):
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


# ---- workers (one measurement each, in a fresh process) ---------------------------------------------

def head_step(args):
    """One step of the head (ours or the dense reference) on per-image class features."""
    import torch
    from torch.nn import functional as F

    from tests.dense_rada import dense_reference
    from trainers.model.rada_head import RAdaHead

    torch.manual_seed(0)
    device = torch.device(args.device)
    head = RAdaHead(args.dim, num_heads=args.heads).to(device)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, args.dim**-0.5)
    image = F.normalize(torch.randn(args.batch, args.dim, device=device), dim=-1)
    text = F.normalize(torch.randn(args.batch, args.classes, args.dim, device=device), dim=-1)
    forward = dense_reference if args.side == "dense" else RAdaHead.forward

    def step():
        inputs = [image.requires_grad_(args.backward), text.requires_grad_(args.backward)]
        with torch.set_grad_enabled(args.backward):
            logits, mask = forward(head, *inputs, 100.0)
        if args.backward:
            (logits.sum() + mask.mean()).backward()
        return logits

    return step


def build_clip(size):
    from trainers.model.backbones.openai_package import clip_model
    from trainers.model.tiny_clip import build_tiny_clip

    if CLIP_SIZES[size] is None:
        return build_tiny_clip().float()
    import torch

    torch.manual_seed(0)
    return clip_model.CLIP(**CLIP_SIZES[size]).float().eval()


def training_step(args):
    """One training step of CoOp, CoCoOp or RAdaCoCoOp, built as the trainers build them."""
    import torch
    from torch.nn import functional as F

    from trainers.config import defaults
    from trainers.model.backbones import as_backbone
    from trainers.model.compositions import build_classifier, composition_of

    cfg = defaults()
    cfg.TRAINER.COOP.CTX_INIT = "a photo of a"
    cfg.TRAINER.COCOOP.CTX_INIT = "a photo of a"
    backbone = as_backbone(build_clip(args.clip))
    classnames = [f"class {i}" for i in range(args.classes)]
    torch.manual_seed(0)
    model, trained = build_classifier(composition_of(args.side), cfg, backbone, classnames)
    model.to(args.device)
    params = [param for module in trained.values() for param in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    labels = torch.arange(args.batch, device=args.device) % args.classes

    def step():
        logits = model(images).logits
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits.detach()

    return step


def worker(args):
    import torch

    torch.set_num_threads(args.threads if args.worker == "head" else args.step_threads)
    step = head_step(args) if args.worker == "head" else training_step(args)
    meter = PeakMeter(args.device)
    meter.reset()
    logits = step()
    extra = meter.extra()
    del logits
    times = timings(step, args.repeats, args.device)
    print(json.dumps({"times": times, "extra_bytes": extra}))


# ---- the parent: sides in fresh processes, tables ----------------------------------------------------

def measure(args, part, side, batch, classes):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", part, "--side", side, "--batch", str(batch),
        "--classes", str(classes), "--dim", str(args.dim), "--heads", str(args.heads), "--clip", args.clip,
        "--device", args.device, "--threads", str(args.threads), "--step-threads", str(args.step_threads),
        "--repeats", str(args.repeats),
    ] + (["--backward"] if args.backward else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_rounds(args, measurements):
    """{measurement: {"times": [...], "extra_bytes": [...]} or {"error": ...}} over args.rounds rounds."""
    results = {key: {"times": [], "extra_bytes": []} for key in measurements}
    for round_index in range(args.rounds):
        for key in measurements if round_index % 2 == 0 else measurements[::-1]:
            if "error" in results[key]:
                continue
            result = measure(args, *key)
            if "error" in result:
                results[key] = result
                continue
            results[key]["times"] += result["times"]
            results[key]["extra_bytes"].append(result["extra_bytes"])
    return results


def summary(result):
    """(median seconds, peak extra bytes) of a side's runs, or None if it failed."""
    if "error" in result or not result["times"]:
        return None
    return statistics.median(result["times"]), max(result["extra_bytes"])


def head_table(args):
    free = free_bytes(args.device)
    skipped, measurements = {}, []
    for classes in args.classes_list:
        for batch in args.batch_list:
            measurements.append(("head", "ours", batch, classes))
            needed = dense_bytes_estimate(batch, classes, args.heads, 4, args.backward)
            if needed > 0.8 * free:
                skipped[(batch, classes)] = f"skipped: needs ~{needed / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free"
            else:
                measurements.append(("head", "dense", batch, classes))
    results = run_rounds(args, measurements)
    rows = []
    for classes in args.classes_list:
        for batch in args.batch_list:
            dense = summary(results.get(("head", "dense", batch, classes), {"error": ""}))
            for side in ("ours", "dense"):
                key = ("head", side, batch, classes)
                if key not in results:
                    rows.append([classes, batch, side, skipped[(batch, classes)], "", "", ""])
                    continue
                measured = summary(results[key])
                if measured is None:
                    rows.append([classes, batch, side, results[key].get("error", "failed"), "", "", ""])
                    continue
                seconds, extra = measured
                rows.append([
                    classes, batch, side, f"{seconds * 1e3:.1f}", f"{dense[0] / seconds:.2f}x" if dense else "",
                    f"{extra / 2**20:.0f}", f"{dense[1] / max(extra, 1):.1f}x" if dense else "",
                ])
    mode = "forward + backward" if args.backward else "forward (no autograd)"
    print(f"RAda head on per-image class features (B, K, D): D={args.dim}, {args.heads} heads, {args.device} "
          f"float32, {args.threads} threads, {mode}; {args.rounds} rounds x {args.repeats} runs, medians; "
          f"load average {os.getloadavg()[0]:.1f}")
    return rows, ["K", "B", "side", "ms", "speed-up vs dense", "extra MiB", "memory ratio vs dense"]


def step_table(args):
    measurements = [("step", method, batch, args.step_classes) for batch in args.step_batches for method in STEP_METHODS]
    results = run_rounds(args, measurements)
    rows = []
    for batch in args.step_batches:
        coop = summary(results[("step", "CoOp", batch, args.step_classes)])
        for method in STEP_METHODS:
            key = ("step", method, batch, args.step_classes)
            measured = summary(results[key])
            if measured is None:
                rows.append([batch, method, results[key].get("error", "failed"), "", "", "", ""])
                continue
            seconds, extra = measured
            sequences = args.step_classes * (1 if method == "CoOp" else batch)
            rows.append([
                batch, method, sequences, f"{seconds * 1e3:.1f}", f"{seconds * 1e3 / batch:.1f}",
                f"{seconds / coop[0]:.1f}x" if coop else "", f"{extra / 2**20:.0f}",
            ])
    print(f"Training step on the {args.clip} CLIP, K={args.step_classes} classes, {args.device} float32, "
          f"{args.step_threads} threads; {args.rounds} rounds x {args.repeats} runs, medians; "
          f"load average {os.getloadavg()[0]:.1f}")
    return rows, ["B", "method", "text sequences", "step ms", "ms / image", "time vs CoOp", "extra MiB"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["head", "step"], choices=["head", "step"])
    parser.add_argument("--classes-list", type=int, nargs="+", default=[100, 500, 1000], help="head: K")
    parser.add_argument("--batch-list", type=int, nargs="+", default=[4, 32], help="head: B")
    parser.add_argument("--dim", type=int, default=512, help="head: D")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--backward", action="store_true", help="head: time forward + backward")
    parser.add_argument("--clip", default="tiny", choices=sorted(CLIP_SIZES), help="step: the CLIP")
    parser.add_argument("--step-classes", type=int, default=100, help="step: K")
    parser.add_argument("--step-batches", type=int, nargs="+", default=[1, 4, 32], help="step: B")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="head: torch threads")
    # The tiny CLIP's tensors are small: a second thread costs more than it saves, and on shared
    # cores its waits made the same step 10x slower.
    parser.add_argument("--step-threads", type=int, default=1, help="step: torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per side, sides alternated")
    parser.add_argument("--worker", choices=["head", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from tabulate import tabulate

    for part in args.parts:
        rows, headers = head_table(args) if part == "head" else step_table(args)
        print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
        print()


if __name__ == "__main__":
    main()
