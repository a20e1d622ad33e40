"""The GPU check: speed, memory and correctness of the CUDA path in one table (bench/gpu_check.sh).

Nothing is downloaded: CLIP is a randomly initialised full-size ViT-B/16 built with the clip
package's own model class, the classifiers are built from the trainers' declarations
(trainers/model/compositions.py) in the trainers' precision, the demo makes its own dataset and tiny CLIP.

Parts (one table, a row each):
- head: the head alone (blocked, fused, dense) at B=32, K in {100, 500, 1000}, D=512, fp32 and
  fp16 / bf16 autocast: forward and forward+backward ms, peak allocated MiB, and in fp32 the
  relative error of logits and input gradients against the dense formulation in float64;
- train: one training step of RAda, RAdaCoOp, RAdaMaPLe and RAdaAdapter at batch 32, K=500, PREC
  fp16 and amp, and of RAdaFT (the image encoder trained) in amp:
  it/s and peak memory, checking on the way that CLIP holds the precision the trainer claims
  (PREC fp16: fp16 weight matrices; amp: fp32 weights and fp16 activations; trainable modules
  fp32 master weights) and that no operation of a step after the first touches a CPU tensor;
- determinism: RAdaCoOp (PREC amp) under DETERMINISTIC trained twice from the same start for a
  few steps: the weights must be bitwise equal (it/s shows the cost against the train row);
- eval: RAda over 1000 classes at test batch 100 (PREC fp16): images/s and the head's peak memory
  (goal: at most 8 GB);
- ttt: one image of test-time training at K=1000 (64 views), ours vs TPT's loop (bench/ttt.py);
- demo: scripts/rada/demo.sh end to end on the device (one seed, two epochs), which must pass.

Exit status 1 when a check fails. An error in a case becomes a FAILED row (its traceback on
stderr) and the other cases still run, so that one GPU session gets the whole table. `--device cpu --small` runs every part but the demo at toy sizes
(the test suite runs it so that this script does not rot), with PREC fp16 and amp in real half
precision on the CPU where this torch has the kernels, so that their checks run there too.
"""

import argparse
import contextlib
import copy
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from bench.head import PeakMeter, head_step, timings  # noqa: E402

HEAD_GOAL_BYTES = 8 * 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sizes(small):
    if small:
        return SimpleNamespace(batch=4, classes_list=[12], dim=64, heads=8, train_classes=6, train_batch=2,
                               eval_classes=12, eval_batch=4, eval_batches=1, ttt_classes=20, ttt_views=7,
                               repeats=1, warmup=1)
    return SimpleNamespace(batch=32, classes_list=[100, 500, 1000], dim=512, heads=8, train_classes=500,
                           train_batch=32, eval_classes=1000, eval_batch=100, eval_batches=5, ttt_classes=1000,
                           ttt_views=63, repeats=5, warmup=2)


class Table:
    HEADERS = ["part", "case", "fwd ms", "fwd+bwd ms", "peak MiB", "throughput", "check"]

    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, part, case, fwd="", fwd_bwd="", peak="", throughput="", check="", ok=True):
        self.rows.append([part, case, fwd, fwd_bwd, peak, throughput, check if ok else f"FAILED: {check}"])
        if not ok:
            self.failures.append(f"{part} {case}: {check}")

    def print(self):
        from tabulate import tabulate

        print(tabulate(self.rows, headers=self.HEADERS, tablefmt="github"))


@contextlib.contextmanager
def failures_reported(table, part, case):
    """An exception inside becomes a FAILED row (its traceback on stderr) and the check goes on, so
    that one GPU run still gives every other row."""
    try:
        yield
    except Exception as error:  # any failure is a result to report
        traceback.print_exc()
        message = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        table.add(part, case, check=f"{type(error).__name__}: {message}", ok=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def mib(value):
    return f"{value / 2**20:.0f}"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the head alone ---------------------------------------------------------------------------------
def head_errors(impl, size, classes, device):
    """Relative errors of logits and input gradients of impl in fp32 against the dense head in float64."""
    from tests.dense_rada import dense_reference
    from trainers.model.rada_head import RAdaHead

    torch.manual_seed(0)
    head = RAdaHead(size.dim, num_heads=size.heads, attention_impl=impl).to(device)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, size.dim**-0.5)
    image = torch.nn.functional.normalize(torch.randn(size.batch, size.dim, device=device), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(classes, size.dim, device=device), dim=-1)
    results = []
    for forward, module, dtype in ((RAdaHead.forward, head, torch.float32),
                                   (dense_reference, copy.deepcopy(head).double(), torch.float64)):
        inputs = [image.detach().to(dtype).requires_grad_(), text.detach().to(dtype).requires_grad_()]
        logits, mask = forward(module, *inputs, 100.0)
        (logits.sum() + mask.square().mean()).backward()
        results.append([logits.detach().double(), inputs[0].grad.double(), inputs[1].grad.double()])
    errors = [((ours - ref).norm() / ref.norm()).item() for ours, ref in zip(*results, strict=True)]
    return max(errors)


def check_head(table, size, device):
    from trainers.model.rada_head import fused_attention_available

    for classes in size.classes_list:
        for dtype_name, dtype in DTYPES.items():
            for impl in ("blocked", "fused", "dense"):
                case = f"{impl} B={size.batch} K={classes} {dtype_name}"
                if impl == "fused" and not fused_attention_available(device, dtype):
                    table.add("head", case, check=f"no fused kernel for {device.type} {dtype_name} in this torch")
                    continue
                try:
                    values = {}
                    for backward in (False, True):
                        step = head_step(impl, size.batch, classes, size.dim, size.heads, device, dtype, backward)
                        meter = PeakMeter(device.type)
                        meter.reset()
                        step()
                        peak = meter.extra()
                        values[backward] = (statistics.median(timings(step, size.repeats, device.type)), peak)
                        del step
                    check = ""
                    ok = True
                    if dtype == torch.float32 and impl != "dense":
                        error = head_errors(impl, size, classes, device)
                        ok = error < 1e-4
                        check = f"rel. error vs dense fp64 {error:.1e}"
                except RuntimeError as error:  # e.g. no fp16 kernels on this CPU
                    table.add("head", case, check=f"not run: {str(error).splitlines()[0][:80]}")
                    continue
                table.add("head", case, f"{values[False][0] * 1e3:.1f}", f"{values[True][0] * 1e3:.1f}",
                          mib(max(values[False][1], values[True][1])), check=check, ok=ok)


# ---- trainers ---------------------------------------------------------------------------------------
def build_clip(small):
    """A random CLIP: the tiny test CLIP (--small) or a full-size ViT-B/16, float32, on the CPU."""
    from clip.model import CLIP

    from trainers.model.tiny_clip import build_tiny_clip

    torch.manual_seed(0)
    if small:
        return build_tiny_clip().float()
    return CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12).float()


def base_cfg(small):
    """Dassl's default config (when installed) with this project's keys."""
    from trainers.config import defaults, extend_cfg

    try:
        from dassl.config import get_cfg_default

        cfg = extend_cfg(get_cfg_default())
    except ImportError:
        cfg = defaults()
        cfg.DATASET.NAME = ""  # Dassl's key, which the trainers' prompt templates read
    if small:
        cfg.TRAINER.MAPLE.PROMPT_DEPTH = 2  # the tiny CLIP has two layers per encoder
    return cfg


# Config values a trainer's shipped configs set away from the defaults, where its training step depends on them.
SHIPPED_OVERRIDES = {"RAdaAdapter": ("TRAINER.ADAPTER.RATIO", 0.5, "TRAINER.ADAPTER.TEXT", True)}


def compose(trainer, cfg, precision, clip_model, classnames):
    """(classifier, trainable modules) as the trainer of that name composes them (its declaration in
    trainers/model/compositions.py), with the values of SHIPPED_OVERRIDES, on a copy of clip_model cast
    to `precision`."""
    from trainers.model.backbones import as_backbone
    from trainers.model.compositions import build_classifier, composition_of

    cfg = cfg.clone()
    cfg.merge_from_list(list(SHIPPED_OVERRIDES.get(trainer, ())))
    backbone = precision.cast_clip(as_backbone(copy.deepcopy(clip_model)))
    return build_classifier(composition_of(trainer), cfg, backbone, classnames)


class HostTensorWatch(TorchDispatchMode):
    """Records every operation that gets a CPU tensor (other than a 0-d scalar) while active."""

    def __init__(self):
        super().__init__()
        self.operations = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and leaf.dim() > 0:
                self.operations.add(str(func))
        return func(*args, **kwargs)


def precision_problems(model, trainable, precision, activation_dtype):
    """What contradicts the precision the trainer claims (an empty list when nothing does)."""
    problems = []
    trained = {id(p) for module in trainable.values() for p in module.parameters()}
    frozen_matrices = [m.weight for m in model.modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) not in trained]
    wrong = [w.dtype for w in frozen_matrices if w.dtype != precision.clip_dtype]
    if wrong:
        problems.append(f"{len(wrong)} CLIP weight matrices in {wrong[0]}, not {precision.clip_dtype}")
    if precision.mode != "fp16":
        wrong = [p.dtype for p in model.parameters() if id(p) not in trained and p.dtype != torch.float32]
        if wrong:
            problems.append(f"{len(wrong)} CLIP parameters in {wrong[0]} under {precision.mode}, not float32")
    wrong = [p.dtype for module in trainable.values() for p in module.parameters() if p.dtype != torch.float32]
    if wrong:
        problems.append(f"{len(wrong)} trainable parameters in {wrong[0]}, not float32 master weights")
    expected = torch.float16 if precision.mode in ("fp16", "amp") else torch.float32
    if activation_dtype != expected:
        problems.append(f"image features in {activation_dtype} under {precision.mode}, expected {expected}")
    return problems


def train_step(model, precision, optimizer, scaler, images, labels):
    """One step as CLIPTrainer.forward_backward takes it (trainers/engine.py)."""
    from trainers.model.rada_head import rada_loss

    with precision.autocast():
        output = model(images)
        loss = rada_loss(output.logits, output.mask, labels, 0.0)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def training_setup(trainer, mode, size, device, base_clip):
    """(model, trainable modules, precision, step) of one training step of `trainer` under PREC `mode`,
    on fixed images and labels; the classifier and optimiser are built as the trainer builds them."""
    from trainers.model.precision import Precision, cpu_runs_half_precision

    classnames = [f"class {i}" for i in range(size.train_classes)]
    resolution = base_clip.visual.input_resolution
    cfg = base_cfg(size.batch < 32)
    precision = Precision(mode, device, half_on_cpu=cpu_runs_half_precision())
    torch.manual_seed(1)  # the CoOp / MaPLe context starts random
    model, trainable = compose(trainer, cfg, precision, base_clip, classnames)
    model.to(device)
    params = [p for module in trainable.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    images = torch.randn(size.train_batch, 3, resolution, resolution, device=device)
    labels = torch.randint(size.train_classes, (size.train_batch,), device=device)
    step = functools.partial(train_step, model, precision, optimizer, precision.grad_scaler(), images, labels)
    return model, trainable, precision, step


# Each trainer of the train part and its PREC values; fine-tuning runs in amp only (fp16 becomes amp).
TRAIN_CASES = (("RAda", ("fp16", "amp")), ("RAdaCoOp", ("fp16", "amp")), ("RAdaMaPLe", ("fp16", "amp")),
               ("RAdaAdapter", ("fp16", "amp")), ("RAdaFT", ("amp",)))


def check_training(table, size, device, base_clip):
    for trainer, modes in TRAIN_CASES:
        for mode in modes:
            case = f"{trainer} PREC {mode} B={size.train_batch} K={size.train_classes}"
            with failures_reported(table, "train", case):
                check_training_case(table, case, trainer, mode, size, device, base_clip)


def check_training_case(table, case, trainer, mode, size, device, base_clip):
    """One row of the train part: a trainer's step under one PREC, timed and checked."""
    model, trainable, precision, step = training_setup(trainer, mode, size, device, base_clip)
    seen = {}
    encode = model.encode

    def recording_encode(batch, encode=encode, seen=seen):
        image_features, text_features = encode(batch)
        seen.setdefault("dtype", image_features.dtype)
        return image_features, text_features

    # The first step makes one-time moves (OpenAI CLIP moves each block's attention mask to the
    # device on first use); the watched second step must touch no CPU tensor at all.
    step()
    model.encode = recording_encode  # the classifier's forward calls self.encode
    watch = HostTensorWatch()
    with watch:
        step()
    del model.encode
    for _ in range(size.warmup - 2):
        step()
    meter = PeakMeter(device.type)
    meter.reset()
    seconds = statistics.median(timings(step, size.repeats, device.type))
    peak = meter.extra()
    problems = precision_problems(model, trainable, precision, seen.get("dtype"))
    if device.type == "cuda" and watch.operations:
        problems.append(f"CPU tensors in {', '.join(sorted(watch.operations)[:3])}")
    claim = f"CLIP {precision.mode}, trainables fp32" + (", no CPU tensors" if device.type == "cuda" else "")
    table.add("train", case, fwd_bwd=f"{seconds * 1e3:.1f}", peak=mib(peak),
              throughput=f"{1 / seconds:.2f} it/s", check="; ".join(problems) or claim, ok=not problems)


def check_determinism(table, size, device, base_clip):
    """DETERMINISTIC: RAdaCoOp under PREC amp, trained twice for a few steps from the same start, must
    end in bitwise-equal weights (the head then takes its blocked attention on CUDA)."""
    from trainers.runs.random_state import torch_switches_restored, use_deterministic_algorithms

    steps = max(size.warmup, 2)
    with torch_switches_restored():
        use_deterministic_algorithms()
        states, seconds = [], []
        for _ in range(2):
            model, trainable, _, step = training_setup("RAdaCoOp", "amp", size, device, base_clip)
            impl = "fused" if model.head.uses_fused_attention(device, torch.float32) else "blocked"
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            seconds.append((time.perf_counter() - start) / steps)
            states.append({f"{name}.{key}": value.detach().clone() for name, module in trainable.items()
                           for key, value in module.state_dict().items()})
            del model, trainable, step
    differing = [key for key, value in states[0].items() if not torch.equal(value, states[1][key])]
    check = (f"{len(differing)} tensor(s) differ, e.g. {differing[0]}" if differing
             else f"2 runs of {steps} steps bitwise equal (head: {impl})")
    table.add("determinism", f"RAdaCoOp PREC amp DETERMINISTIC B={size.train_batch} K={size.train_classes}",
              fwd_bwd=f"{statistics.median(seconds) * 1e3:.1f}", throughput=f"{1 / statistics.median(seconds):.2f} it/s",
              check=check, ok=not differing)


def check_evaluation(table, size, device, base_clip):
    from trainers.model.precision import Precision, cpu_runs_half_precision

    precision = Precision("fp16", device, half_on_cpu=cpu_runs_half_precision())
    cfg = base_cfg(size.batch < 32)
    classnames = [f"class {i}" for i in range(size.eval_classes)]
    model, _ = compose("RAda", cfg, precision, base_clip, classnames)
    model.to(device)
    resolution = base_clip.visual.input_resolution
    images = torch.randn(size.eval_batch, 3, resolution, resolution, device=device)
    meter, peaks = PeakMeter(device.type), []
    before = model.head.register_forward_pre_hook(lambda module, inputs: meter.reset())
    after = model.head.register_forward_hook(lambda module, inputs, output: peaks.append(meter.extra()))
    with torch.no_grad(), precision.autocast():
        model(images)  # encodes the class prompts once (cached) and warms up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(size.eval_batches):
            model(images)
        synchronize(device)
        seconds = time.perf_counter() - start
    before.remove()
    after.remove()
    peak = max(peaks)
    table.add("eval", f"RAda PREC fp16 K={size.eval_classes} test batch {size.eval_batch}", peak=mib(peak),
              throughput=f"{size.eval_batch * size.eval_batches / seconds:.0f} images/s",
              check=f"head peak {peak / 2**30:.2f} GB (goal <= 8 GB)", ok=peak <= HEAD_GOAL_BYTES)


def check_ttt(table, size, device):
    from bench import ttt

    args = SimpleNamespace(views=size.ttt_views, fraction=0.1, dim=size.dim, heads=size.heads, device=device.type,
                           threads=torch.get_num_threads(), repeats=size.repeats)
    results = {impl: ttt.measure(args, impl, size.ttt_classes, 1) for impl in ("ours", "tpt")}
    errors = [f"{impl}: {result['error']}" for impl, result in results.items() if "error" in result]
    case = f"one image, K={size.ttt_classes}, 1 + {size.ttt_views} views, 1 step"
    if errors:
        table.add("ttt", case, check="; ".join(errors), ok=False)
        return
    ours, tpt = results["ours"], results["tpt"]
    gap = max(abs(a - b) for a, b in zip(ours["prediction"], tpt["prediction"], strict=True))
    summary = f"speed-up {tpt['seconds'] / ours['seconds']:.2f}x, logit gap {gap:.1e}"
    for name, result in (("ours", ours), ("TPT loop", tpt)):
        table.add("ttt", f"{name}: {case}", fwd_bwd=f"{result['seconds'] * 1e3:.1f}", peak=mib(result["extra_bytes"]),
                  check=summary if name == "ours" else "", ok=gap < 1e-3)


def check_demo(table, device):
    # This interpreter first on PATH: the demo runs in this environment (scripts/setup_env.sh).
    environment = dict(os.environ, SEEDS="1", EPOCHS="2",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if device.type == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as scratch:
        environment.update(DEMO_OUTPUT=os.path.join(scratch, "output"), DATA=os.path.join(scratch, "data"))
        start = time.perf_counter()
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "rada", "demo.sh")], cwd=ROOT,
                                env=environment, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        table.add("demo", "scripts/rada/demo.sh", check=f"exit {result.returncode}: {tail[0][:100]}", ok=False)
        return
    table.add("demo", f"scripts/rada/demo.sh on {device.type} (1 seed, 2 epochs)", fwd_bwd=f"{seconds * 1e3:.0f}",
              check="passed")


PARTS = ["head", "train", "determinism", "eval", "ttt", "demo"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="toy sizes, no demo (for the test suite)")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run with --device cpu --small for the CPU parts",
              file=sys.stderr)
        return 2
    if "determinism" in args.parts:  # cuBLAS reads its workspace setting once, before the first product
        from trainers.runs.random_state import CUBLAS_WORKSPACE

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    device = torch.device(args.device)
    size = sizes(args.small)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {'small sizes' if args.small else 'full sizes'}")
    table = Table()
    start = time.perf_counter()
    base_clip = build_clip(args.small) if {"train", "determinism", "eval"} & set(args.parts) else None
    checks = {
        "head": lambda: check_head(table, size, device),
        "train": lambda: check_training(table, size, device, base_clip),
        "determinism": lambda: check_determinism(table, size, device, base_clip),
        "eval": lambda: check_evaluation(table, size, device, base_clip),
        "ttt": lambda: check_ttt(table, size, device),
        "demo": lambda: check_demo(table, device),
    }
    for part in PARTS:
        if part in args.parts and not (part == "demo" and args.small):
            with failures_reported(table, part, "(this part stopped here)"):
                checks[part]()
    table.print()
    print(f"gpu_check: {time.perf_counter() - start:.0f} s, "
          + (f"{len(table.failures)} check(s) FAILED" if table.failures else "all checks passed"))
    return 1 if table.failures else 0


if __name__ == "__main__":
    sys.exit(main())
