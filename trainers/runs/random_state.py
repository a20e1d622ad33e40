"""The random number generators a training run draws from, captured and restored as plain data, so
that a run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Dassl's loaders shuffle with torch's global generator (its RandomSampler has none of its own) and
seed their workers from it; a sampler or loader given its own `torch.Generator` is saved too.
"""

import contextlib
import logging
import os
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)
# cuBLAS's setting for reproducible results (CUDA's documentation); read when cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"


def _generators(loaders):
    """{'<loader>.generator' or '<loader>.sampler': generator} of the loaders that own one."""
    found = {}
    for name, loader in loaders.items():
        if loader is None:
            continue
        for owner, label in ((loader, "generator"), (getattr(loader, "sampler", None), "sampler")):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found[f"{name}.{label}"] = generator
    return found


def capture(loaders=None):
    """The state of Python's, NumPy's and torch's (CPU and every CUDA device) generators and of
    the loaders' own generators, as tensors, numbers and tuples (readable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": {name: generator.get_state() for name, generator in _generators(loaders or {}).items()},
    }
    return state


def restore(state, loaders=None):
    """Puts the generators back where capture() found them."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    generators = _generators(loaders or {})
    for name, generator_state in state.get("loaders", {}).items():
        if name in generators:
            generators[name].set_state(generator_state)


def _as_tuples(value):
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def use_deterministic_algorithms():
    """Make GPU runs reproducible: deterministic cuDNN and torch kernels, no cuDNN autotuning, and
    cuBLAS's reproducible workspace (unless the environment sets its own). Operations torch has no
    deterministic kernel for warn instead of failing, so a run never stops on one."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.info("DETERMINISTIC: deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)",
                os.environ["CUBLAS_WORKSPACE_CONFIG"])


@contextlib.contextmanager
def torch_switches_restored():
    """Puts cuDNN's and torch's determinism switches back as they were on leaving, for checks that
    turn deterministic algorithms on inside one process (bench/gpu_check.py, the tests)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        yield
    finally:
        benchmark, deterministic, enabled, warn_only = saved
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
