"""KgCoOp and ProGrad (Dassl glue), each alone and with the RAda head; the pure pieces are in
trainers/model/guided_prompts.py.

Both learn CoOp's context, configured by TRAINER.COOP as CoOp is (N_CTX, CSC, CTX_INIT,
CLASS_TOKEN_POSITION, PREC: the keys KgCoOp's and ProGrad's code read), and both look at zero-shot
CLIP's features of one hand-written prompt per training class, computed once when the model is built.

- KgCoOp / RAdaKgCoOp: the loss gains TRAINER.KGCOOP.W x the knowledge gap (1 - mean cosine between
  prompted and hand-written class features); RAdaKgCoOp's loss keeps the mask penalty too.
- ProGrad / RAdaProGrad: each step computes the gradient of the cross-entropy (plus the mask penalty
  with a head) and that of the distillation loss towards zero-shot CLIP's predictions, and projects
  the first against the second where they conflict (TRAINER.PROGRAD.LAMBDA, T) before the optimisers step.
"""

import logging

import torch

from .engine import CLIPTrainer, register_trainer
from .errors import UserFacingError
from .model.compositions import COMPOSITIONS
from .model.guided_prompts import (
    distillation_loss,
    hand_written_features,
    kgcoop_loss,
    kgcoop_template,
    knowledge_gap,
    prograd_template,
    project_conflicting,
    zero_shot_logits,
)
from .runs import distributed

logger = logging.getLogger(__name__)


class HandWrittenReferenceTrainer(CLIPTrainer):
    """A trainer that keeps zero-shot CLIP's features of a hand-written prompt for each training class
    (`reference_features`, K x E, normalised, float32); `template_of(dataset name)` gives the prompt."""

    template_of = None

    def build_model(self):
        super().build_model()
        template = type(self).template_of(self.cfg.DATASET.NAME)
        logger.info("Zero-shot reference prompts: %r", template)
        self.reference_features = hand_written_features(self.model.text_encoder, self.dm.dataset.classnames,
                                                        template)


class KgCoOpTrainer(HandWrittenReferenceTrainer):
    """Knowledge-guided context optimisation: cross-entropy (and the head's mask penalty) +
    W x (1 - mean over classes of cos(prompted feature, hand-written feature))."""

    template_of = staticmethod(kgcoop_template)

    def compute_loss(self, output, targets):
        return kgcoop_loss(output, targets, self.reference_features, self.cfg.TRAINER.KGCOOP.W,
                           self.cfg.TRAINER.RADA.ALPHA)

    def training_summary(self, output, labels, loss):
        summary = super().training_summary(output, labels, loss)
        summary["knowledge_gap"] = knowledge_gap(output.text_features.detach(), self.reference_features).item()
        return summary


@register_trainer
class KgCoOp(KgCoOpTrainer):
    """CoOp's context kept close to the hand-written prompt's class features (KgCoOp)."""

    composition = COMPOSITIONS["KgCoOp"]


@register_trainer
class RAdaKgCoOp(KgCoOpTrainer):
    """KgCoOp's context and the RAda head, trained together; the knowledge gap is measured on the
    prompted class features (before the head), the head's mask penalty is kept."""

    composition = COMPOSITIONS["RAdaKgCoOp"]


class ProGradTrainer(HandWrittenReferenceTrainer):
    """Prompt-aligned gradient. Per step: the cross-entropy L_ce (plus the mask penalty with a head)
    and the distillation loss L_kl between the model's and zero-shot CLIP's predictions on the same
    images (temperature T); for each context tensor, g = g_ce if g_ce . g_kl >= 0, else
    g_ce - LAMBDA (g_ce . g_kl / ||g_kl||^2) g_kl; then every optimiser steps. L_kl itself is never
    descended.

    Zero-shot CLIP is the model's own frozen CLIP: CoOp's prompts leave the image encoder as it is,
    so the teacher's image features are the model's, and its class features are the hand-written
    prompts' (ProGrad keeps a second, float32 CLIP for the same).

    With the RAda head (RAdaProGrad) only the prompt context's gradient is projected; the head takes
    its plain gradient of the cross-entropy and mask penalty. ProGrad's rule keeps the prompt from
    moving against what the hand-written prompt knows; the head is no part of zero-shot CLIP (it
    starts as the identity on the prompted features) and has its own pull towards that start, the
    mask penalty.

    Under PREC amp both losses are scaled by the same power of two; the projection is unchanged by a
    common scale of both gradients (and exact in binary floating point), so it is applied to the
    scaled gradients, and a non-finite one makes the GradScaler skip the step as usual.
    """

    template_of = staticmethod(prograd_template)

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.PROGRAD.INIT_FROM_TEMPLATE and cfg.TRAINER.COOP.CTX_INIT:
            raise UserFacingError(
                f"TRAINER.PROGRAD.INIT_FROM_TEMPLATE initialises the context from ProGrad's template of the dataset, "
                f"so TRAINER.COOP.CTX_INIT ({cfg.TRAINER.COOP.CTX_INIT!r}) would be ignored: set one of the two only."
            )

    def build_model(self):
        super().build_model()
        self.projected_parameters = [p for p in self.model.prompts.parameters() if p.requires_grad]

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        output, targets, loss = distributed.run_step(self.data_parallel, self.forward_loss, images, labels)
        teacher = zero_shot_logits(self.model.logit_scale, output.image_features, self.reference_features)
        kl_loss = distillation_loss(output.logits, teacher, self.cfg.TRAINER.PROGRAD.T)
        conflicts = self._projected_backward_and_step(loss, kl_loss)
        self.step_schedulers()
        summary = self.training_summary(output, targets, loss)
        summary["kl"] = kl_loss.item()
        summary["conflicts"] = conflicts
        return summary

    def _projected_backward_and_step(self, loss, kl_loss):
        """Writes the projected cross-entropy gradient into the context's .grad and steps every optimiser;
        returns the share of projected tensors whose gradients conflicted."""
        scaler = self.scaler
        self._refuse_non_finite(loss, others={"distillation loss": kl_loss})
        self.model_zero_grad()
        params = self.projected_parameters
        kl_grads = torch.autograd.grad(scaler.scale(kl_loss), params, retain_graph=True)
        kl_grads = distributed.average_over_processes(kl_grads)  # every process projects the same pair
        scaler.scale(loss).backward()  # distributed: DDP averages these over the processes
        conflicts = 0
        with torch.no_grad():
            for param, kl_grad in zip(params, kl_grads, strict=True):
                conflicts += int(torch.sum(param.grad * kl_grad) < 0)
                param.grad.copy_(project_conflicting(param.grad, kl_grad, self.cfg.TRAINER.PROGRAD.LAMBDA))
        self._step_optimisers()
        return conflicts / len(params)


@register_trainer
class ProGrad(ProGradTrainer):
    """CoOp's context trained with ProGrad's projected gradient."""

    composition = COMPOSITIONS["ProGrad"]


@register_trainer
class RAdaProGrad(ProGradTrainer):
    """ProGrad's context and the RAda head, trained together: the context's gradient is projected,
    the head's is not (see ProGradTrainer)."""

    composition = COMPOSITIONS["RAdaProGrad"]
