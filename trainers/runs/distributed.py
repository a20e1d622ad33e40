"""Data-parallel training and evaluation over torch.distributed, for processes started by torchrun.

    torchrun --nproc_per_node N train.py <the usual arguments>

Every process holds the whole model. Training: each optimisation step takes one global batch of
DATALOADER.TRAIN_X.BATCH_SIZE samples, each process computes B / N of it, and
DistributedDataParallel averages the gradients, so the step is the step of one process on the
whole batch. Evaluation: each process classifies every N-th test image and the predictions are
gathered, each image once. Process 0 alone writes logs, tensorboard and checkpoints.

Without torchrun (WORLD_SIZE unset or 1) every function here is the identity or a no-op, so a
single-process run takes exactly the code path it takes without this module.

Nothing here needs Dassl; trainers/engine.py hooks it into the trainers.
"""

import atexit
import contextlib
import datetime
import functools
import inspect
import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, Sampler

from ..errors import UserFacingError

logger = logging.getLogger(__name__)

# Seconds a collective waits for the other processes before failing. A process that dies is
# reported by torchrun within seconds; this bounds a process that hangs instead.
TIMEOUT_ENV = "RADA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


# ---- the process group ----------------------------------------------------------------------------
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed():
    return world_size() > 1


def is_main_process():
    return rank() == 0


def join_process_group(use_cuda):
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) until the program exits: NCCL with one GPU per process when CUDA is
    used, gloo on the CPU. Nothing happens when WORLD_SIZE is unset or 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if use_cuda and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserFacingError(
                f"Process {os.environ.get('RANK')} has local rank {local_rank} but this machine shows "
                f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node "
                "(torchrun --nproc_per_node, GPUS=N in the scripts)."
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(_leave_process_group)
    logger.info("Process %d of %d (%s backend)", rank(), world_size(), backend)


def _leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Process 0 runs the block first, then the others: what it writes (a few-shot cache) is
    complete before any other process reads it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def on_main_process(method):
    """Decorator: the call runs on process 0 only, and every process returns once it has finished
    (so files it writes exist for all afterwards)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs) if is_main_process() else None
        barrier()
        return result

    return wrapper


def seed_per_process(seed):
    """Reseed torch per process (seed + rank) so that the processes draw different random
    augmentations; called after the model is built, whose random initialisation is therefore
    the same in every process, and before a resumed run restores each process's own state."""
    if is_distributed():
        torch.manual_seed(max(seed, 0) + rank())


def gather_objects(value):
    """Every process's `value` (picklable), in rank order, in every process; [value] in one process."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- training data --------------------------------------------------------------------------------
def per_process_batch(global_batch, count):
    """The batch of each of `count` processes: the configured (global) batch divided by their number."""
    if global_batch % count:
        raise UserFacingError(
            f"DATALOADER.TRAIN_X.BATCH_SIZE {global_batch} is the global batch, split evenly over the {count} "
            f"processes: choose a multiple of {count} or another number of processes."
        )
    return global_batch // count


class GlobalBatchSampler(Sampler):
    """Indices of one process's share of each global batch of an epoch.

    Per epoch, the dataset is shuffled by a generator seeded with seed + epoch (set_epoch), cut
    into global batches of `global_batch` (the incomplete last one dropped, as Dassl's training
    loader does; a dataset smaller than one batch is one batch), and process r takes the r-th
    slice of every batch. So the global batches are the same for any number of processes, and
    every sample is seen once per epoch across processes. A dataset smaller than one batch loses
    its len % world_size last shuffled samples, so that every process gets as many.
    """

    def __init__(self, size, global_batch, rank, world_size, seed=0):
        if size < world_size:
            raise UserFacingError(
                f"The training set has {size} sample(s), fewer than the {world_size} processes: use fewer processes."
            )
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, max(seed, 0)
        self.global_batch = min(global_batch, size - size % world_size)
        self.steps = max(size // global_batch, 1)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.steps * self.global_batch // self.world_size

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.steps * self.global_batch]
        shares = order.view(self.steps, self.world_size, -1)[:, self.rank]
        return iter(shares.flatten().tolist())


class ShardSampler(Sampler):
    """Every world_size-th index from `rank`: the processes' shards partition the dataset without
    padding, and shard r holds images r, r + N, r + 2N, ... in order."""

    def __init__(self, size, rank, world_size):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self):
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))


def _reloaded(loader, sampler, batch_size):
    """The same dataset and workers as `loader`, read through `sampler` in batches of `batch_size`."""
    return DataLoader(
        loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, drop_last=False,
    )


def distributed_train_loader(loader, global_batch, seed):
    """The training loader of this process (GlobalBatchSampler, batch global / N); `loader` unchanged
    in a single process."""
    if not is_distributed():
        return loader
    if not isinstance(loader.sampler, RandomSampler):
        raise UserFacingError(
            f"Training with several processes shuffles like DATALOADER.TRAIN_X.SAMPLER RandomSampler; the configured "
            f"{type(loader.sampler).__name__} has no distributed counterpart here: train in one process."
        )
    sampler = GlobalBatchSampler(len(loader.dataset), global_batch, rank(), world_size(), seed)
    return _reloaded(loader, sampler, per_process_batch(global_batch, world_size()))


def sharded_loader(loader):
    """The evaluation loader of this process (its ShardSampler shard); `loader` itself in a single
    process or when there is none."""
    if loader is None or not is_distributed():
        return loader
    return _reloaded(loader, ShardSampler(len(loader.dataset), rank(), world_size()), loader.batch_size)


def set_epoch(loader, epoch):
    if isinstance(getattr(loader, "sampler", None), GlobalBatchSampler):
        loader.sampler.set_epoch(epoch)


# ---- gradients ------------------------------------------------------------------------------------
class _DataParallelStep(nn.Module):
    """The trained modules under one parent whose forward runs any function: DDP sees the whole
    training forward (which may call the modules in any way: through the classifier, forward hooks,
    caption encoders) and all-reduces the gradients of every trained parameter."""

    def __init__(self, modules):
        super().__init__()
        self.trained = nn.ModuleDict(modules)

    def forward(self, compute, *args):
        return compute(*args)


def data_parallel(modules):
    """DistributedDataParallel over the modules (name -> module) that have trainable parameters, or
    None in a single process or when nothing trains. The modules themselves are unchanged (their
    state dicts gain no `module.` prefix); run a step with run_step."""
    trained = {name: module for name, module in modules.items() if any(p.requires_grad for p in module.parameters())}
    if not is_distributed() or not trained:
        return None
    # Buffers are synchronised once, not every step: those of the prompt learners are large constants;
    # the others (running statistics) are made equal before each evaluation (broadcast_buffers).
    return DistributedDataParallel(_DataParallelStep(trained), device_ids=None, **_NO_BUFFER_SYNC_PER_STEP)


# The keyword was renamed in torch 2.14 (the old one still works, with a FutureWarning).
_NO_BUFFER_SYNC_PER_STEP = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def run_step(parallel, compute, *args):
    """compute(*args), through DistributedDataParallel when `parallel` is one."""
    return compute(*args) if parallel is None else parallel(compute, *args)


def broadcast_buffers(modules):
    """Give every process the persistent buffers (e.g. batch-norm statistics) of process 0."""
    if not is_distributed():
        return
    for module in modules:
        for buffer in module.state_dict(keep_vars=True).values():
            if isinstance(buffer, torch.Tensor) and not isinstance(buffer, nn.Parameter):
                _broadcast_in_place(buffer)


def _broadcast_in_place(tensor):
    staged = tensor.data.to(_collective_device())
    dist.broadcast(staged, src=0)
    tensor.data.copy_(staged)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward returns to each process the gradient of the loss with respect to
    its own slice, summed over the processes (each of which computed the loss on the whole batch)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def average_over_processes(tensors):
    """The tensors averaged in place over the processes, as DDP averages .grad (for gradients taken with
    torch.autograd.grad, which bypasses DDP's all-reduce); returned as given in a single process."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= world_size()
    return tensors


def gather_batch(tensor):
    """The (N * B, ...) concatenation over processes of each one's (B, ...) tensor, gradients flowing
    back to the local rows; `tensor` itself in a single process.

    A loss computed on the gathered batch is the loss of the global batch in every process. The
    local rows receive its gradient summed over the N processes, N times the gradient of the one
    loss, and DistributedDataParallel's average over processes divides it by N again: N processes
    with B rows each train exactly as one process with N * B rows.
    """
    return _GatherWithGradient.apply(tensor) if is_distributed() else tensor


# ---- evaluation -----------------------------------------------------------------------------------
def _gather_rows(tensor):
    """[tensor of each process], for tensors whose first dimension differs between processes."""
    device = _collective_device()
    local = tensor.to(device)
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [part[: int(c)].cpu() for part, c in zip(parts, counts, strict=True)]


def interleave_shards(shards):
    """The dataset-order concatenation of ShardSampler shards (shard r holds items r, r + N, ...)."""
    total = sum(shard.shape[0] for shard in shards)
    merged = torch.empty((total, *shards[0].shape[1:]), dtype=shards[0].dtype)
    for position, shard in enumerate(shards):
        merged[position :: len(shards)] = shard
    return merged


def sum_over_processes(*counts):
    """The sums over processes of some integers, the integers themselves in a single process."""
    if not is_distributed():
        return counts
    total = torch.tensor(counts, dtype=torch.long, device=_collective_device())
    dist.all_reduce(total)
    return tuple(int(value) for value in total.tolist())


class ShardedEvaluator:
    """Wraps a Dassl-style classification evaluator (reset / process(logits, labels) / evaluate)
    for loaders read through ShardSampler: each process records the predicted class of its images;
    evaluate() gathers them in dataset order, each image once, and has process 0 evaluate them with
    the wrapped evaluator (which computes everything from the predicted classes); every process
    returns process 0's results."""

    CHUNK = 4096  # predictions handed to the wrapped evaluator at a time, as one-hot rows

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.reset()

    def reset(self):
        self.evaluator.reset()
        self._predictions, self._labels, self._classes = [], [], 0

    def process(self, logits, labels):
        self._classes = max(self._classes, logits.shape[1])
        self._predictions.append(logits.max(1)[1].cpu())  # the wrapped evaluator's own argmax
        self._labels.append(labels.cpu())

    def evaluate(self):
        empty = torch.zeros(0, dtype=torch.long)
        local = torch.stack([torch.cat(self._predictions or [empty]), torch.cat(self._labels or [empty])], dim=1)
        merged = interleave_shards(_gather_rows(local))
        (classes,) = _max_over_processes(self._classes)
        results = None
        if is_main_process():
            for start in range(0, merged.shape[0], self.CHUNK):
                predictions, labels = merged[start : start + self.CHUNK].unbind(dim=1)
                self.evaluator.process(nn.functional.one_hot(predictions, classes).float(), labels)
            results = self.evaluator.evaluate()
        shared = [results]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


def _max_over_processes(*values):
    total = torch.tensor(values, dtype=torch.long, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return tuple(int(value) for value in total.tolist())


def sharded_evaluator(evaluator):
    return ShardedEvaluator(evaluator) if is_distributed() else evaluator
