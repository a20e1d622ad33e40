"""Speed and memory of the RAda head against the dense formulation of the method spec.

Each measurement runs in a fresh process: build the head and the inputs, reset the peak
counter, run one forward (the memory measurement: peak minus what was in use before it),
then time further forwards (median). Every side gets the same weights and inputs. The sides
(and a measurement of the machine's fp32 matmul rate) alternate within each of --rounds rounds,
the order reversed every round, and the table shows the median over all timed runs, so that
load from other processes hits every side alike.

    python bench/head.py                      # CPU, float32, forward without autograd
    python bench/head.py --device cuda --dtype float16
    python bench/head.py --backward           # forward + backward (training step)

Sides: "blocked" and "fused" are the head's two attention implementations (see
trainers/model/rada_head.py), "dense" the spec written out literally (tests/dense_rada.py).
GFLOP/s counts the spec's arithmetic (the same count for every side; the backward pass
counted as twice the forward, recomputation not counted), against the measured matmul rate.

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


def timings(run, repeats, device):
    """Wall times of `repeats` calls of run(), waiting for the GPU around each."""
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
    return times


def median_seconds(run, repeats, device):
    return statistics.median(timings(run, repeats, device))


def head_flops(batch, classes, dim, backward):
    """The spec's arithmetic: four D x D maps of the (B, K, D) rational matrix (key, value, rational
    query, output), two K x K attention streams (scores and mix, 2 * 2 * B * K * K * D) and the
    small terms; a backward pass counts twice."""
    forward = 8 * batch * classes * dim * dim + 8 * batch * classes * classes * dim
    forward += 2 * classes * dim * dim + 2 * batch * dim * dim + 4 * batch * classes * dim
    return forward * (3 if backward else 1)


def head_step(impl, batch, classes, dim, heads, device, dtype, backward):
    """A function running one step of the head (implementation impl, or the dense reference) with
    random weights, as a training (backward) or evaluation step at this size."""
    import torch
    from torch.nn import functional as F

    sys.path.insert(0, ROOT)
    from tests.dense_rada import dense_reference
    from trainers.model.rada_head import RAdaHead

    torch.manual_seed(0)
    device = torch.device(device)
    head = RAdaHead(dim, num_heads=heads, attention_impl="auto" if impl == "dense" else impl).to(device)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, dim**-0.5)
    image = F.normalize(torch.randn(batch, dim, device=device), dim=-1)
    text = F.normalize(torch.randn(classes, dim, device=device), dim=-1)
    forward = dense_reference if impl == "dense" else RAdaHead.forward
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        inputs = [image.requires_grad_(backward), text]
        with torch.set_grad_enabled(backward), autocast:
            logits, mask = forward(head, *inputs, 100.0)
        if backward:
            (logits.float().sum() + mask.float().mean()).backward()
        return logits

    return step


def matmul_worker(args):
    import torch

    torch.set_num_threads(args.threads)
    size = 4096
    left, right = (torch.randn(size, size, device=args.device) for _ in range(2))
    times = timings(lambda: left @ right, args.repeats, args.device)
    print(json.dumps({"gflops": [2 * size**3 / t / 1e9 for t in times]}))


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    step = head_step(args.impl, args.batch, args.classes, args.dim, args.heads, args.device,
                     getattr(torch, args.dtype), args.backward)
    meter = PeakMeter(args.device)
    meter.reset()
    logits = step()
    extra = meter.extra()
    checksum = float(logits.float().sum())
    del logits
    times = timings(step, args.repeats, args.device)
    print(json.dumps({"times": times, "extra_bytes": extra, "checksum": checksum}))


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
    parser.add_argument("--impls", nargs="+", default=["blocked", "fused", "dense"],
                        choices=["auto", "blocked", "fused", "dense"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per side, sides alternated")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--worker", choices=["auto", "blocked", "fused", "dense", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        return matmul_worker(args) if args.worker == "matmul" else worker(args)

    from tabulate import tabulate

    sides = [(impl, classes) for classes in args.classes_list for impl in args.impls] + [("matmul", 0)]
    results = {side: {"times": [], "gflops": [], "extra_bytes": []} for side in sides}
    errors = {}
    load_before = os.getloadavg()[0]  # the ratios depend on what else runs (bench/README.md)
    for round_index in range(args.rounds):
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            result = measure(args, *side)
            if "error" in result:
                errors[side] = result["error"]
                continue
            for key in ("times", "gflops"):
                results[side][key] += result.get(key, [])
            results[side]["extra_bytes"].append(result.get("extra_bytes", 0))
    matmul = statistics.median(results[("matmul", 0)]["gflops"]) if results[("matmul", 0)]["gflops"] else float("nan")
    mode = "forward + backward" if args.backward else "forward (no autograd)"
    print(f"RAda head: B={args.batch}, D={args.dim}, {args.heads} heads, {args.device} {args.dtype}, "
          f"{args.threads} threads, {mode}; {args.rounds} rounds x {args.repeats} runs, medians; "
          f"fp32 matmul 4096^2: {matmul:.0f} GFLOP/s; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    rows = []
    for classes in args.classes_list:
        dense = results.get(("dense", classes))
        dense_seconds = statistics.median(dense["times"]) if dense and dense["times"] else None
        dense_bytes = max(dense["extra_bytes"]) if dense and dense["extra_bytes"] else None
        for impl in args.impls:
            side = (impl, classes)
            if side in errors or not results[side]["times"]:
                rows.append([classes, impl, errors.get(side, "failed"), "", "", "", "", ""])
                continue
            seconds = statistics.median(results[side]["times"])
            extra = max(results[side]["extra_bytes"])
            gflops = head_flops(args.batch, classes, args.dim, args.backward) / seconds / 1e9
            rows.append([
                classes, impl, f"{seconds * 1e3:.1f}",
                f"{dense_seconds / seconds:.2f}x" if dense_seconds else "",
                f"{extra / 2**20:.0f}", f"{dense_bytes / max(extra, 1):.1f}x" if dense_bytes else "",
                f"{gflops:.0f}", f"{gflops / matmul:.0%}",
            ])
    print(tabulate(rows, headers=["K", "side", "ms", "speed-up vs dense", "extra MiB", "memory ratio vs dense",
                                  "GFLOP/s", "of matmul"], tablefmt="github"))


if __name__ == "__main__":
    main()
