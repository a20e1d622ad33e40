"""CoCoOp trainers: image-conditioned prompts, alone and with the RAda head on the per-image class features."""

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS


@register_trainer
class CoCoOp(CLIPTrainer):
    """Conditional prompt learning: CoOp's context shifted per image by a meta-net."""

    composition = COMPOSITIONS["CoCoOp"]


@register_trainer
class RAdaCoCoOp(CLIPTrainer):
    """CoCoOp's prompts and the RAda head on each image's own class features, trained together;
    configured like CoCoOp."""

    composition = COMPOSITIONS["RAdaCoCoOp"]
