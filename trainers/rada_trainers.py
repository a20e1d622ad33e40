"""RAda trainers: the head on frozen CLIP with hand-crafted prompts, and on CoOp prompts. Their loss
is CLIPTrainer's: cross-entropy plus the mask penalty whenever a head made the logits."""

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS


@register_trainer
class RAda(CLIPTrainer):
    """The head on frozen CLIP with fixed hand-crafted prompts (the authors' main EFT trainer)."""

    composition = COMPOSITIONS["RAda"]


@register_trainer
class RAdaCoOp(CLIPTrainer):
    """CoOp's learnable prompts and the head, trained together; configured like CoOp."""

    composition = COMPOSITIONS["RAdaCoOp"]
