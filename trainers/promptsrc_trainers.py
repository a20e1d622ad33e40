"""PromptSRC and RAdaPromptSRC: IVLP's prompts (TRAINER.PROMPTSRC) trained with the self-regulating
losses towards the frozen CLIP and averaged over epochs by Gaussian prompt aggregation (GPA);
trainers/model/promptsrc.py has the rules.

The teacher is this model's own frozen CLIP, unprompted: the prompts enter only inside the prompt
source's calls (forward pre-hooks that exist for their duration), so the image encoder called
directly is the zero-shot encoder. The teacher's text features are computed once, before training,
in float32 (from a float32 copy of the text tower when CLIP runs in fp16, as the authors' fp32 copy).

GPA: after each epoch (after its last batch and the lr update) the trained tensors, weighted by
g(epoch), join a running sum (a PromptAverage, saved in every checkpoint set); after the last epoch
the sum replaces the trained tensors before that epoch's checkpoint set is written, so the final
test and model.pth.tar-N hold the average, and a run resumed from any earlier set ends on the same
tensors. RAdaPromptSRC averages its RAda head with the prompts: the authors average the whole model
(every trainable tensor), and a head kept at its last epoch would be paired with prompts it was never
trained with.
"""

import copy
import logging

import torch
from torch.nn import functional as F

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS
from .model.prompts import TEMPLATE_SETS
from .model.promptsrc import (
    TEACHER_TEMPLATES,
    PromptAverage,
    gaussian_weights,
    promptsrc_loss,
    teacher_logits,
    teacher_text_features,
)
from .model.rada_head import mask_penalty

logger = logging.getLogger(__name__)


class PromptSRCTrainer(CLIPTrainer):
    """PromptSRC's objective and GPA on the composition's prompts (and head)."""

    def build_model(self):
        super().build_model()
        settings = self.cfg.TRAINER.PROMPTSRC
        weights = gaussian_weights(self.cfg.OPTIM.MAX_EPOCH, settings.GPA_MEAN, settings.GPA_STD)
        logger.info("GPA weights of epochs 1..%d: %s", len(weights), ", ".join(f"{w:.3f}" for w in weights))
        self.prompt_average = PromptAverage(weights)
        self.run_keeper.add_state("prompt_average", self.prompt_average)
        self.teacher_text = None

    def before_train(self):
        self.teacher_text = self.build_teacher_text()
        super().before_train()

    def build_teacher_text(self):
        text_encoder = self.model.text_encoder
        if text_encoder.dtype != torch.float32:
            text_encoder = copy.deepcopy(text_encoder).float()
        features = teacher_text_features(text_encoder, self.dm.dataset.classnames)
        logger.info("PromptSRC teacher: text features of %d classes, mean over %d templates", features.shape[0],
                    len(TEMPLATE_SETS[TEACHER_TEMPLATES]))
        return features

    @torch.no_grad()
    def teacher_image_features(self, images):
        """The frozen, unprompted image encoder's normalised features of the same images."""
        model = self.model
        return F.normalize(model.image_encoder(images.to(model.backbone.image_dtype)).float(), dim=-1)

    def forward_loss(self, images, labels):
        """The composition's output and PromptSRC's loss (plus the mask penalty with a head)."""
        settings = self.cfg.TRAINER.PROMPTSRC
        with self.precision.autocast():
            output, targets = self.forward_train(images, labels)
            teacher_image = self.teacher_image_features(images)
            zero_shot = teacher_logits(self.model.logit_scale.detach(), teacher_image, self.teacher_text)
            loss = promptsrc_loss(output.logits, targets, zero_shot, output.image_features, teacher_image,
                                  output.text_features, self.teacher_text, settings.TEXT_LOSS_WEIGHT,
                                  settings.IMAGE_LOSS_WEIGHT)
            return output, targets, loss + mask_penalty(output.mask, self.cfg.TRAINER.RADA.ALPHA)

    def after_epoch(self):
        self.aggregate_prompts()
        super().after_epoch()  # then the checkpoint set: the average after the last epoch

    def aggregate_prompts(self):
        self.prompt_average.add(self.epoch, self.trained_tensors())
        if self.epoch + 1 == self.max_epoch:
            self.load_average()

    def trained_tensors(self):
        """{module/key: tensor} of the floating-point state of every trained module."""
        return {f"{name}/{key}": tensor for name, module in self._models.items()
                for key, tensor in module.state_dict().items() if tensor.is_floating_point()}

    @torch.no_grad()
    def load_average(self):
        trained = self.trained_tensors()
        for name, average in self.prompt_average.total.items():
            trained[name].copy_(average)
        logger.info("GPA: the weighted average of epochs 1..%d replaces the trained tensors", self.max_epoch)


@register_trainer
class PromptSRC(PromptSRCTrainer):
    """IVLP's prompts regularised towards the frozen CLIP, averaged over epochs (PromptSRC)."""

    composition = COMPOSITIONS["PromptSRC"]


@register_trainer
class RAdaPromptSRC(PromptSRCTrainer):
    """PromptSRC with the RAda head, trained together; the head is averaged with the prompts."""

    composition = COMPOSITIONS["RAdaPromptSRC"]
