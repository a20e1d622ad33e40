"""Speed and memory of the RAda head against the dense formulation of the method spec.

Each measurement runs in a fresh process: build the head and the inputs, reset the peak
counter, run one forward (the memory measurement: peak minus what was in use before it),
then time further forwards (median). Both formulations get the same weights and inputs.

    python bench/head.py                      # CPU, float32, forward without autograd
    python bench/head.py --device cuda --dtype float16
    python bench/head.py --backward           # forward + backward (training step)

On the CPU "extra peak memory" is the rise of the process's peak resident set size
(VmHWM, reset through /proc/self/clear_refs); on CUDA it is torch's peak allocated memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    def __init__(self, device):
        self.device = device

    def reset(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident size
            self.base = _rss_kib("VmRSS") * 1024

    def extra(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def median_seconds(run, repeats, device):
    """Median wall time of `repeats` calls of run(), waiting for the GPU around each."""
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args):
    import torch
    from torch.nn import functional as F

    sys.path.insert(0, ROOT)
    from tests.dense_rada import dense_reference
    from trainers.core.rada_head import RAdaHead

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    head = RAdaHead(args.dim, num_heads=args.heads).to(device)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, args.dim**-0.5)
    image = F.normalize(torch.randn(args.batch, args.dim, device=device), dim=-1)
    text = F.normalize(torch.randn(args.classes, args.dim, device=device), dim=-1)
    forward = RAdaHead.forward if args.impl == "ours" else dense_reference
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        inputs = [image.requires_grad_(args.backward), text]
        with torch.set_grad_enabled(args.backward), autocast:
            logits, mask = forward(head, *inputs, 100.0)
        if args.backward:
            (logits.float().sum() + mask.float().mean()).backward()
        return logits

    meter = PeakMeter(args.device)
    meter.reset()
    logits = step()
    extra = meter.extra()
    checksum = float(logits.float().sum())
    del logits
    seconds = median_seconds(step, args.repeats, args.device)
    print(json.dumps({"seconds": seconds, "extra_bytes": extra, "checksum": checksum}))


def measure(args, impl, classes):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", impl, "--classes", str(classes),
        "--batch", str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads),
        "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
        "--repeats", str(args.repeats),
    ] + (["--backward"] if args.backward else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes-list", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--worker", choices=["ours", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        return worker(args)

    from tabulate import tabulate

    mode = "forward + backward" if args.backward else "forward (no autograd)"
    print(f"RAda head vs dense: B={args.batch}, D={args.dim}, {args.heads} heads, {args.device} {args.dtype}, "
          f"{args.threads} threads, {mode}")
    rows = []
    for classes in args.classes_list:
        ours, dense = measure(args, "ours", classes), measure(args, "dense", classes)
        if "error" in ours or "error" in dense:
            rows.append([classes, ours.get("error", ""), dense.get("error", ""), "", "", "", ""])
            continue
        rows.append([
            classes,
            f"{ours['seconds'] * 1e3:.1f}", f"{dense['seconds'] * 1e3:.1f}",
            f"{dense['seconds'] / ours['seconds']:.2f}x",
            f"{ours['extra_bytes'] / 2**20:.0f}", f"{dense['extra_bytes'] / 2**20:.0f}",
            f"{dense['extra_bytes'] / max(ours['extra_bytes'], 1):.1f}x",
        ])
    print(tabulate(rows, headers=["K", "ours ms", "dense ms", "speed-up", "ours MiB", "dense MiB", "memory ratio"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
