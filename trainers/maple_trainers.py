"""MaPLe trainers: coupled vision-language prompts, alone and with the RAda head."""

from .engine import CLIPTrainer, register_trainer
from .model.maple import MaPLeClassifier, maple_prompt_learner
from .rada_trainers import RAdaMixin


@register_trainer
class MaPLe(CLIPTrainer):
    """Multi-modal prompt learning: deep text prompts and vision prompts coupled to them."""

    PREC_NODE = "MAPLE"
    LEARNS_PROMPTS = True

    def build_classifier(self, backbone, classnames):
        return MaPLeClassifier(backbone, maple_prompt_learner(self.cfg, backbone, classnames))

    def trainable_modules(self):
        return {"prompt_learner": self.model.prompts}


@register_trainer
class RAdaMaPLe(RAdaMixin, CLIPTrainer):
    """MaPLe's prompts and the RAda head, trained together; configured like MaPLe."""

    PREC_NODE = "MAPLE"
    LEARNS_PROMPTS = True

    def build_classifier(self, backbone, classnames):
        prompts = maple_prompt_learner(self.cfg, backbone, classnames)
        return MaPLeClassifier(backbone, prompts, head=self.build_head())

    def trainable_modules(self):
        return {"prompt_learner": self.model.prompts, "rada_head": self.model.head}
