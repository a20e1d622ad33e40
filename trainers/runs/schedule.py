"""Dassl's learning-rate schedules rebuilt from torch's own schedulers.

Dassl 0.6.3's warm-up wrappers break on current torch (they pass `verbose` positionally)
and pickle their successor scheduler, which `torch.load(weights_only=True)` refuses. This
builds the same schedule, epoch by epoch, from LambdaLR + SequentialLR, whose state dicts
are plain data. Stepped once per epoch, as Dassl trainers do.

With base rate lr, MAX_EPOCH T, WARMUP_EPOCH W and Dassl's default WARMUP_RECOUNT, the rate
of epoch e (0-based) is:
    e < W (constant):  WARMUP_CONS_LR
    e < W (linear):    WARMUP_MIN_LR if e == 0 else lr * e / W
    e >= W (cosine):   lr * (1 + cos(pi * (e - W) / T)) / 2
    e >= W (single_step / multi_step): lr * GAMMA ** (number of milestones <= e - W)
"""

import warnings

from torch.optim import lr_scheduler

from ..errors import UserFacingError

SCHEDULERS = ("single_step", "multi_step", "cosine")
WARMUP_TYPES = ("constant", "linear")


def _main_scheduler(optimizer, optim_cfg):
    name = optim_cfg.LR_SCHEDULER
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(optim_cfg.MAX_EPOCH))
    stepsize = optim_cfg.STEPSIZE
    if name == "single_step":
        step = stepsize[-1] if isinstance(stepsize, (list, tuple)) else stepsize
        return lr_scheduler.StepLR(optimizer, step_size=step if step > 0 else optim_cfg.MAX_EPOCH,
                                   gamma=optim_cfg.GAMMA)
    if name == "multi_step":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(stepsize), gamma=optim_cfg.GAMMA)
    raise ValueError(f"OPTIM.LR_SCHEDULER must be one of {', '.join(SCHEDULERS)}, got {name!r}")


class _WarmupFactor:
    """Multiplier of the base rate during warm-up; a class so that it has no state to save."""

    def __init__(self, kind, warmup_epochs, start_lr, base_lr):
        self.kind, self.warmup_epochs, self.start_lr, self.base_lr = kind, warmup_epochs, start_lr, base_lr

    def __call__(self, epoch):
        if self.kind == "constant" or epoch == 0:
            return self.start_lr / self.base_lr
        return epoch / self.warmup_epochs


def build_lr_scheduler(optimizer, optim_cfg):
    main = _main_scheduler(optimizer, optim_cfg)
    warmup_epochs = optim_cfg.WARMUP_EPOCH
    if warmup_epochs <= 0:
        return main
    kind = optim_cfg.WARMUP_TYPE
    if kind not in WARMUP_TYPES:
        raise ValueError(f"OPTIM.WARMUP_TYPE must be one of {', '.join(WARMUP_TYPES)}, got {kind!r}")
    start_lr = optim_cfg.WARMUP_CONS_LR if kind == "constant" else optim_cfg.WARMUP_MIN_LR
    warmup = lr_scheduler.LambdaLR(optimizer, _WarmupFactor(kind, warmup_epochs, start_lr, optim_cfg.LR))
    with warnings.catch_warnings():
        # SequentialLR steps its children with an explicit epoch, which torch flags as deprecated.
        warnings.simplefilter("ignore", UserWarning)
        return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def require_per_step_schedule(optim_cfg, trainer, schedule):
    """Trainers whose schedule counts optimiser steps (`schedule` says how, for the message) refuse
    OPTIM's epoch schedule other than a cosine, and its warm-up epochs."""
    if optim_cfg.LR_SCHEDULER != "cosine" or optim_cfg.WARMUP_EPOCH > 0:
        raise UserFacingError(
            f"{trainer} {schedule}: set OPTIM.LR_SCHEDULER cosine and OPTIM.WARMUP_EPOCH 0 (got "
            f"{optim_cfg.LR_SCHEDULER!r} and {optim_cfg.WARMUP_EPOCH})."
        )
