"""Pure pieces of full fine-tuning (FT, FLYP, RAdaFT): optimiser parameter groups, the per-step
learning-rate schedule, FLYP's contrastive loss
and the restriction of ImageNet logits to the classes of a test set that covers only some of them.

Nothing here needs Dassl; `trainers.finetune_trainers` composes these pieces into trainers.
"""

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR

from .rada_head import mask_penalty

logger = logging.getLogger(__name__)

# Parameters that shape features rather than mix them get no weight decay: those of normalisation
# layers and embedding tables, biases and other vectors, and these parameters of CLIP by name.
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


# ---- precision ------------------------------------------------------------------------------------
def finetune_precision(requested):
    """The PREC a fine-tuning trainer runs in. fp16 would put CLIP's own fp16 weights under the
    optimiser, which loses small updates; it becomes amp (fp32 weights, fp16 autocast)."""
    if requested == "fp16":
        logger.warning("PREC fp16 would train CLIP's weights in half precision; fine-tuning uses amp instead "
                       "(float32 weights, float16 autocast, loss scaling)")
        return "amp"
    return requested


def check_master_weights(param_groups):
    """Refuse an optimiser over half-precision weights: every trained parameter must be float32."""
    for group in param_groups:
        for param in group["params"]:
            if param.dtype != torch.float32:
                raise ValueError(f"A trained parameter of shape {tuple(param.shape)} is {param.dtype}; the optimiser "
                                 "needs float32 master weights (cast CLIP with PREC fp32 or amp)")


# ---- parameter groups -----------------------------------------------------------------------------
def split_weight_decay(module):
    """(decayed, exempt): the trainable parameters of `module`, each once, in module order.

    Exempt from weight decay: parameters of normalisation layers and embeddings, every parameter
    with fewer than two dimensions (biases, scales, the class token), positional embeddings and
    the logit scale. Weight matrices and convolution kernels are decayed.
    """
    exempt_ids = set()
    for submodule in module.modules():
        exempt_module = isinstance(submodule, NO_DECAY_MODULES)
        for name, param in submodule.named_parameters(recurse=False):
            if exempt_module or param.ndim < 2 or name in NO_DECAY_NAMES:
                exempt_ids.add(id(param))
    decayed, exempt = [], []
    for param in module.parameters():
        if param.requires_grad:
            (exempt if id(param) in exempt_ids else decayed).append(param)
    return decayed, exempt


def parameter_groups(module, lr, weight_decay):
    """Optimiser groups of `module`: its decayed parameters at `weight_decay`, the rest at 0, both at `lr`."""
    decayed, exempt = split_weight_decay(module)
    groups = [
        {"params": decayed, "lr": lr, "weight_decay": weight_decay},
        {"params": exempt, "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


class LogitScale(nn.Module):
    """CLIP's (log) logit scale as a module of its own, so that it can be registered, optimised and
    checkpointed like the encoders. It shares the parameter with the classifier."""

    def __init__(self, parameter):
        super().__init__()
        self.logit_scale = parameter


# ---- learning-rate schedule -----------------------------------------------------------------------
class WarmupCosine:
    """Multiplier of the base rate at optimiser step s (0-based), FLYP's schedule: (s + 1) / W for
    the first W steps, then a half cosine from 1 down to 0 at step T (total steps).

    A class with plain attributes, so a LambdaLR built on it saves plain data.
    """

    def __init__(self, warmup_steps, total_steps):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine_scheduler(optimizer, warmup_steps, total_steps):
    """A scheduler stepped after every optimiser step; each group decays from its own rate."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))


# ---- losses ---------------------------------------------------------------------------------------
def contrastive_loss(logits_per_image):
    """CLIP's symmetric contrastive loss over a batch of B image-caption pairs: logits (B, B) with
    image i's own caption in column i. Other captions are negatives, also those of the same class
    (FLYP's loss: no special handling of a class that appears twice in a batch)."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def sigmoid_loss(logits_per_image):
    """SigLIP's pairwise sigmoid loss over a batch of B image-caption pairs: logits (B, B) (with the
    model's logit bias) with image i's own caption in column i; every other pair is a negative.
    Summed over pairs and divided by B, as SigLIP (and open_clip's SigLipLoss) do."""
    labels = 2 * torch.eye(logits_per_image.shape[0], device=logits_per_image.device, dtype=logits_per_image.dtype) - 1
    return -F.logsigmoid(labels * logits_per_image).sum() / logits_per_image.shape[0]


def flyp_loss(logits_per_image, mask=None, alpha=0.0, objective="softmax"):
    """FLYP's contrastive loss in the backbone's own form ("softmax": CLIP's, "sigmoid": SigLIP's)
    plus the mask penalty of a head that made the logits (the term `rada_loss` adds to the
    cross-entropy)."""
    loss = contrastive_loss(logits_per_image) if objective == "softmax" else sigmoid_loss(logits_per_image)
    return loss + mask_penalty(mask, alpha)


# ---- class subsets of ImageNet --------------------------------------------------------------------
def subset_index(members):
    """(S, M) index into ImageNet logits: row i lists the ImageNet labels of subset class i, padded
    by repeating its first label (a repeat leaves a maximum unchanged)."""
    if not members or any(not labels for labels in members):
        raise ValueError("Every class of the subset needs at least one ImageNet label")
    width = max(len(labels) for labels in members)
    rows = [list(labels) + [labels[0]] * (width - len(labels)) for labels in members]
    return torch.tensor(rows, dtype=torch.long)


def restrict_logits(logits, index):
    """Logits (B, S) of the subset classes from ImageNet logits (B, N): for each subset class the
    largest logit among its ImageNet classes (WiSE-FT's and FLYP's evaluation of ImageNet-A/-R,
    which select one class each, and of ObjectNet, whose classes may merge several)."""
    return logits[:, index.to(logits.device)].amax(dim=-1)
