"""Throughput of a data-parallel training step: 1 process against N (trainers/runs/distributed.py).

One step = forward, loss, backward (gradients all-reduced by DistributedDataParallel across the
processes) and the optimiser step, on one global batch split evenly over the processes, as
`torchrun --nproc_per_node N train.py` runs it. Two workloads on the tiny CLIP of the tests (224 px
input) with the RAda head: RAdaCoOp (prompt context and head trained) and RAdaFT (the whole image
encoder and the head trained: a larger all-reduce). The processes are started with
torch.multiprocessing and gloo on the CPU (NCCL with --device cuda, one GPU per process); on a
CPU each process runs --threads threads (default 1: on a shared machine more threads than free
cores make OpenMP spin and the timings meaningless).

    python bench/ddp.py                          # CPU: 1 and 2 processes
    python bench/ddp.py --device cuda --processes 1 2 4 8
"""

import argparse
import os
import socket
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.head import median_seconds  # noqa: E402

CLASSES = [f"class {index}" for index in range(10)]


def build(workload, device):
    """(classifier, trained modules) of a workload on the tiny CLIP, in float32."""
    from trainers.model.classifier import CLIPClassifier
    from trainers.model.prompts import CoOpPromptLearner, FixedPrompts
    from trainers.model.rada_head import RAdaHead
    from trainers.model.tiny_clip import TINY_EMBED_DIM, build_tiny_clip

    clip_model = build_tiny_clip().float()
    head = RAdaHead(TINY_EMBED_DIM)
    if workload == "RAdaCoOp":
        model = CLIPClassifier(clip_model, CoOpPromptLearner(clip_model, CLASSES, n_ctx=4, ctx_init="a photo of a"),
                               head=head)
        trained = {"prompt_learner": model.prompts, "rada_head": head}
    else:
        model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, "a photo of a {}."), head=head)
        trained = {"image_encoder": model.image_encoder, "rada_head": head}
    model.requires_grad_(False)
    for module in trained.values():
        module.requires_grad_(True)
    return model.to(device), trained


def measure(rank, world, port, workload, batch, steps, device, threads, out_dir):
    import torch
    from torch.nn import functional as F

    from trainers.runs import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if device == "cpu":
        torch.set_num_threads(threads)
    distributed.join_process_group(use_cuda=device == "cuda")
    device_name = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    model, trained = build(workload, device_name)
    parallel = distributed.data_parallel(trained)
    params = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    local = batch // world
    images = torch.randn(local, 3, 224, 224, generator=generator).to(device_name)
    labels = (torch.arange(local) % len(CLASSES)).to(device_name)

    def forward_loss(images, labels):
        output = model(images)
        return output, F.cross_entropy(output.logits, labels)

    def step():
        _, loss = distributed.run_step(parallel, forward_loss, images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up
        step()
    distributed.barrier()
    seconds = median_seconds(step, steps, device)
    if distributed.is_main_process():
        with open(os.path.join(out_dir, f"{workload}-{world}.txt"), "w") as handle:
            handle.write(str(seconds))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp
    from tabulate import tabulate

    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for workload in ("RAdaCoOp", "RAdaFT"):
            single = None
            for world in args.processes:
                threads = args.threads
                mp.spawn(measure, nprocs=world, args=(world, free_port(), workload, args.batch, args.steps,
                                                       args.device, threads, out_dir))
                with open(os.path.join(out_dir, f"{workload}-{world}.txt")) as handle:
                    seconds = float(handle.read())
                throughput = args.batch / seconds
                single = single or throughput
                rows.append([workload, world, threads if args.device == "cpu" else "-", args.batch // world,
                             round(seconds * 1000, 1), round(throughput, 1), f"{throughput / single:.2f}x"])
    print(f"torch {torch.__version__}, {args.device}, {cores} CPU cores, global batch {args.batch}")
    print(tabulate(rows, headers=["workload", "processes", "threads each", "batch each", "step ms", "images/s",
                                  "vs 1 process"], tablefmt="github"))


if __name__ == "__main__":
    main()
