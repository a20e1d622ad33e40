"""Full fine-tuning trainers: FT, FLYP and RAdaFT.

All three update CLIP's image encoder (and, by config, its text encoder) and classify the way
zero-shot CLIP does, through class prompts and the text encoder; they differ only in their
configs (TRAINER.FT), so the head's effect and the objective's are each one setting apart:

- FT: cross-entropy over the class prompts, text encoder frozen (its features cached).
- FLYP: "finetune like you pretrain" (Goyal et al., CVPR 2023): the model's own contrastive loss
  (CLIP's softmax loss; SigLIP's sigmoid loss on a model with a logit bias) between the images of a
  batch and captions of their class names, both encoders and the logit scale trained.
- RAdaFT: FT with the RAda head between the features and the logits; TRAINER.FT.OBJECTIVE flyp
  (with TRAIN_TEXT_ENCODER and TRAIN_LOGIT_SCALE True) trains it with FLYP's objective instead.

Each trained module gets its own optimiser (decayed weight matrices; no decay on norms, biases,
embeddings and the logit scale) and a per-step warm-up + cosine schedule (FLYP's); CLIP's weights
stay float32 under every optimiser (PREC amp or fp32).
"""

import logging

import torch
from dassl.optim import build_optimizer

from .engine import CLIPTrainer, register_trainer
from .errors import UserFacingError
from .model.compositions import COMPOSITIONS
from .model.finetune import (
    check_master_weights,
    flyp_loss,
    parameter_groups,
    restrict_logits,
    subset_index,
    warmup_cosine_scheduler,
)
from .model.prompts import resolve_templates
from .runs import distributed

logger = logging.getLogger(__name__)


class FineTuneTrainer(CLIPTrainer):
    """What FT, FLYP and RAdaFT share; TRAINER.FT says what trains and with which objective (the
    trainers' configs set their values)."""

    PER_STEP_SCHEDULE = "warms up per step (TRAINER.FT.WARMUP_STEPS) and then decays with a cosine"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        try:
            resolve_templates(cfg.TRAINER.FT.TEMPLATES, cfg.DATASET.NAME)
        except ValueError as error:
            raise UserFacingError(f"TRAINER.FT.TEMPLATES: {error}.") from None

    # ---- data ---------------------------------------------------------------------------------
    def build_data_loader(self):
        """Also decides, from the test set, over which classes the model classifies."""
        super().build_data_loader()
        cfg = self.cfg
        self.imagenet_subset = None
        if cfg.TRAINER.FT.IMAGENET_SUBSET_EVAL:
            self.imagenet_subset = getattr(self.dm.dataset, "imagenet_subset", None)
        self.subset_index = None if self.imagenet_subset is None else subset_index(
            self.imagenet_subset.members).to(self.device)  # on the logits' device: no copy per batch

    # ---- model --------------------------------------------------------------------------------
    def build_classifier(self, backbone, classnames):
        subset = self.imagenet_subset
        if subset is not None:
            logger.info(
                "%s covers %d of the %d ImageNet classes of its classnames.txt: classifying over all of them and "
                "keeping, for each of its classes, the largest logit of its ImageNet classes (as WiSE-FT and FLYP).",
                self.cfg.DATASET.NAME, len(subset.members), len(subset.imagenet_classnames),
            )
            classnames = list(subset.imagenet_classnames)
        return super().build_classifier(backbone, classnames)

    def build_optimization(self, name, module):
        cfg = self.cfg
        lr = cfg.TRAINER.FT.HEAD_LR if module is self.model.head else cfg.OPTIM.LR
        groups = parameter_groups(module, lr, cfg.OPTIM.WEIGHT_DECAY)
        check_master_weights(groups)
        optim = build_optimizer(None, cfg.OPTIM, param_groups=groups)
        decayed = sum(len(group["params"]) for group in groups if group["weight_decay"])
        logger.info("%s: lr %.2e, weight decay %g on %d weight tensors, none on the other %d", name, lr,
                    cfg.OPTIM.WEIGHT_DECAY, decayed, sum(len(group["params"]) for group in groups) - decayed)
        total_steps = self.max_epoch * len(self.train_loader_x)
        return optim, warmup_cosine_scheduler(optim, cfg.TRAINER.FT.WARMUP_STEPS, total_steps)

    # ---- training -----------------------------------------------------------------------------
    def train(self):
        if self.subset_index is not None:
            raise UserFacingError(
                f"{self.cfg.DATASET.NAME} is a test set of some of ImageNet's classes: train on ImageNet and evaluate "
                "on it with --eval-only --model-dir <training output>."
            )
        warmup, total = self.cfg.TRAINER.FT.WARMUP_STEPS, self.max_epoch * len(self.train_loader_x)
        if warmup >= total:
            logger.warning("The warm-up (%d steps) is not shorter than the run (%d steps): the learning rate never "
                           "reaches its peak. Lower TRAINER.FT.WARMUP_STEPS.", warmup, total)
        super().train()

    def forward_train(self, images, labels):
        """Under the flyp objective: the batch's images against one caption of each image's class
        (B x B logits, image i's caption in column i); distributed: the global batch, its image and
        caption features gathered from every process."""
        if self.cfg.TRAINER.FT.OBJECTIVE != "flyp":
            return super().forward_train(images, labels)
        model = self.model
        captions = model.prompts.caption_features(model.text_encoder, labels)
        image_features = distributed.gather_batch(model.encode_image(images))
        output = model.classify(image_features, distributed.gather_batch(captions))
        return output, torch.arange(output.logits.shape[0], device=labels.device)

    def compute_loss(self, output, targets):
        if self.cfg.TRAINER.FT.OBJECTIVE != "flyp":
            return super().compute_loss(output, targets)
        return flyp_loss(output.logits, output.mask, self.cfg.TRAINER.RADA.ALPHA,
                         objective=self.model.backbone.objective)

    def model_inference(self, images):
        logits = super().model_inference(images)
        return logits if self.subset_index is None else restrict_logits(logits, self.subset_index)


@register_trainer
class FT(FineTuneTrainer):
    """Full fine-tuning with cross-entropy over the class prompts (the head-less baseline)."""

    composition = COMPOSITIONS["FT"]


@register_trainer
class FLYP(FineTuneTrainer):
    """Finetune like you pretrain: both encoders and the logit scale trained with the contrastive
    loss between images and captions of their class names; evaluated zero-shot style."""

    composition = COMPOSITIONS["FLYP"]

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.FT.OBJECTIVE != "flyp":
            raise UserFacingError(
                "FLYP trains with the flyp objective; for cross-entropy with a trained text encoder use "
                "--trainer FT TRAINER.FT.TRAIN_TEXT_ENCODER True."
            )


@register_trainer
class RAdaFT(FineTuneTrainer):
    """Full fine-tuning with the RAda head (the paper's FFT setting); TRAINER.FT.OBJECTIVE flyp
    trains it with FLYP's objective, the paper's reference."""

    composition = COMPOSITIONS["RAdaFT"]
