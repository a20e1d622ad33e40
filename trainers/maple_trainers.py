"""MaPLe trainers: coupled vision-language prompts, alone and with the RAda head."""

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS


@register_trainer
class MaPLe(CLIPTrainer):
    """Multi-modal prompt learning: deep text prompts and vision prompts coupled to them."""

    composition = COMPOSITIONS["MaPLe"]


@register_trainer
class RAdaMaPLe(CLIPTrainer):
    """MaPLe's prompts and the RAda head, trained together; configured like MaPLe."""

    composition = COMPOSITIONS["RAdaMaPLe"]
