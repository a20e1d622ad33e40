"""Precision handling shared by every trainer: CoOp's PREC values fp16 / fp32 / amp.

- fp16: CLIP's weights stay in half precision, as OpenAI ships them (CoOp's default).
- fp32: CLIP is cast to float32.
- amp:  CLIP in float32, forward passes under float16 autocast, losses scaled by a GradScaler.

Trainable parameters (prompts, adapters, the RAda head) are always float32 master weights and
are cast where they meet half-precision CLIP activations, so no optimizer ever updates fp16
weights in place. Half precision needs a GPU: on the CPU fp16 and amp fall back to fp32, with
a warning.
"""

import contextlib
import functools
import logging

import torch

from ..config import PRECISIONS

logger = logging.getLogger(__name__)


class Precision:
    """half_on_cpu: run fp16 and amp on the CPU as on a GPU (slow; lets bench/gpu_check.py test the
    half-precision paths without one)."""

    def __init__(self, mode, device, half_on_cpu=False):
        if mode not in PRECISIONS:
            raise ValueError(f"Unknown precision {mode!r}: PREC must be one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.requested = mode
        if mode != "fp32" and self.device.type != "cuda" and not half_on_cpu:
            logger.warning("PREC=%s needs a CUDA device; running in fp32 on %s", mode, self.device)
            mode = "fp32"
        self.mode = mode

    @property
    def clip_dtype(self):
        return torch.float16 if self.mode == "fp16" else torch.float32

    def cast_clip(self, backbone):
        """Put the weights of a Backbone in this precision, in place, the library's own way; return it."""
        backbone.cast(self.clip_dtype)
        return backbone

    def autocast(self):
        if self.mode == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def grad_scaler(self):
        enabled = self.mode == "amp"
        if hasattr(torch.amp, "GradScaler"):
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def autocast_enabled(device_type):
    """Whether autocast is on for this device type, on every torch since 2.1."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument and has a separate CPU query
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@functools.cache  # a property of the installed torch: probed once per process
def cpu_runs_half_precision():
    """Whether this torch has the CPU kernels the fp16 paths need (convolution, fp16 autocast)."""
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 2, 2, dtype=torch.half), torch.zeros(1, 1, 1, 1, dtype=torch.half))
        with torch.autocast("cpu", dtype=torch.float16):
            pass
        return True
    except RuntimeError:  # torch < 2.2: no fp16 convolution and no fp16 autocast on the CPU
        return False
