"""The plain CLIP baselines: zero-shot CLIP and CoOp."""

import logging

from .engine import CLIPTrainer, register_trainer
from .model.classifier import CLIPClassifier
from .model.prompts import FixedPrompts, coop_prompt_learner, zero_shot_template

logger = logging.getLogger(__name__)


@register_trainer
class ZeroshotCLIP(CLIPTrainer):
    """CLIP with CoOp's hand-crafted prompt for the dataset; nothing is trained."""

    def build_classifier(self, backbone, classnames):
        return CLIPClassifier(backbone, FixedPrompts(classnames, zero_shot_template(self.cfg.DATASET.NAME)))

    def train(self):
        logger.info("ZeroshotCLIP has nothing to train: evaluating")
        self.test()


@register_trainer
class CoOp(CLIPTrainer):
    """Context optimisation: learnable prompt context, frozen CLIP."""

    LEARNS_PROMPTS = True

    def build_classifier(self, backbone, classnames):
        return CLIPClassifier(backbone, coop_prompt_learner(self.cfg, backbone, classnames))

    def trainable_modules(self):
        return {"prompt_learner": self.model.prompts}
