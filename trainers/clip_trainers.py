"""The plain CLIP baselines: zero-shot CLIP and CoOp."""

import logging

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS

logger = logging.getLogger(__name__)


@register_trainer
class ZeroshotCLIP(CLIPTrainer):
    """CLIP with CoOp's hand-crafted prompt for the dataset; nothing is trained."""

    composition = COMPOSITIONS["ZeroshotCLIP"]

    def train(self):
        logger.info("ZeroshotCLIP has nothing to train: evaluating")
        self.test()


@register_trainer
class CoOp(CLIPTrainer):
    """Context optimisation: learnable prompt context, frozen CLIP."""

    composition = COMPOSITIONS["CoOp"]
