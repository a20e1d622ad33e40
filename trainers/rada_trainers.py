"""RAda trainers: the head on frozen CLIP with hand-crafted prompts, and on CoOp prompts."""

from .engine import CLIPTrainer, register_trainer
from .model.classifier import CLIPClassifier
from .model.prompts import FixedPrompts, coop_prompt_learner, zero_shot_template
from .model.rada_head import RAdaHead, rada_head


class RAdaMixin:
    """What every RAda trainer shares: one head configuration (its loss is CLIPTrainer.compute_loss,
    which adds the mask penalty whenever a head made the logits)."""

    def build_head(self):
        return rada_head(self.cfg, self.backbone["embed_dim"])

    def training_summary(self, output, labels, loss):
        # The regulariser's value whatever ALPHA weighs it with: how far the mask has moved from 1.
        summary = super().training_summary(output, labels, loss)
        summary["mask_penalty"] = RAdaHead.mask_regularizer(output.mask.detach()).item()
        return summary


@register_trainer
class RAda(RAdaMixin, CLIPTrainer):
    """The head on frozen CLIP with fixed hand-crafted prompts (the authors' main EFT trainer)."""

    PREC_NODE = "RADA"

    def build_classifier(self, backbone, classnames):
        template = self.cfg.TRAINER.RADA.TEMPLATE or zero_shot_template(self.cfg.DATASET.NAME)
        return CLIPClassifier(backbone, FixedPrompts(classnames, template), head=self.build_head())

    def trainable_modules(self):
        return {"rada_head": self.model.head}


@register_trainer
class RAdaCoOp(RAdaMixin, CLIPTrainer):
    """CoOp's learnable prompts and the head, trained together; configured like CoOp."""

    LEARNS_PROMPTS = True

    def build_classifier(self, backbone, classnames):
        prompts = coop_prompt_learner(self.cfg, backbone, classnames)
        return CLIPClassifier(backbone, prompts, head=self.build_head())

    def trainable_modules(self):
        return {"prompt_learner": self.model.prompts, "rada_head": self.model.head}
