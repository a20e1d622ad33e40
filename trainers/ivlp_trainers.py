"""IVLP and VPT trainers: independent deep prompts (text and vision, or vision only), and IVLP with the RAda head."""

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS


@register_trainer
class IVLP(CLIPTrainer):
    """Independent deep text and vision prompts, trained with cross-entropy."""

    composition = COMPOSITIONS["IVLP"]


@register_trainer
class RAdaIVLP(CLIPTrainer):
    """IVLP's prompts and the RAda head, trained together; configured like IVLP."""

    composition = COMPOSITIONS["RAdaIVLP"]


@register_trainer
class VPT(CLIPTrainer):
    """VPT-deep: deep vision prompts, the fixed text "a photo of a {}."."""

    composition = COMPOSITIONS["VPT"]
