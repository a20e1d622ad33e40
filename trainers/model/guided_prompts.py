"""CoOp's context guided by zero-shot CLIP: the pure pieces of KgCoOp and ProGrad (no Dassl).

Both learn CoOp's context (trainers/model/prompts.py) and consult what the same frozen CLIP says with
one hand-written prompt per class, each method with its own per-dataset templates (below):

- KgCoOp (Yao et al., CVPR 2023) adds to the cross-entropy W times its knowledge gap: 1 minus the
  mean, over all the training classes, of the cosine between the prompted class feature and the
  hand-written prompt's feature.
- ProGrad (Zhu et al., ICCV 2023) steps along the cross-entropy gradient only, after removing, in
  each parameter tensor whose gradient conflicts with that of a distillation loss towards zero-shot
  CLIP's predictions, lambda times its component along that gradient.

The hand-written features are computed once, without gradients, by the frozen text encoder in the
run's precision (KgCoOp and ProGrad load a second CLIP for them; ProGrad's is float32).
"""

import logging

import torch
from torch.nn import functional as F

from ..errors import UserFacingError
from .prompts import DEFAULT_TEMPLATE, ZERO_SHOT_TEMPLATES, CoOpPromptLearner, FixedPrompts, coop_prompt_learner
from .rada_head import clip_logits, rada_loss

logger = logging.getLogger(__name__)

# KgCoOp's hand-written prompts: CoOp's zero-shot templates but for DTD's.
KGCOOP_TEMPLATES = {**ZERO_SHOT_TEMPLATES, "DescribableTextures": "a photo of a {}, a type of texture."}

# ProGrad's zero-shot teacher prompts, whose words before the class name also initialise its context.
PROGRAD_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a type of food, a photo of {}.",
    "UCF101": "a photo of a person doing {}.",
}


def kgcoop_template(dataset_name):
    return KGCOOP_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)


def prograd_template(dataset_name):
    return PROGRAD_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)


def hand_written_features(text_encoder, classnames, template):
    """L2-normalised float32 features (K, E) of `template` filled with each class name, computed
    without gradients."""
    with torch.no_grad():
        return F.normalize(FixedPrompts(classnames, template)(text_encoder).float(), dim=-1)


# ---- KgCoOp ----------------------------------------------------------------------------------------
def knowledge_gap(text_features, reference_features):
    """1 - mean_k cos(t_k, t^clip_k): the prompted class features against the hand-written ones,
    (K, E) each, averaged over every class (not only those of the batch); eps 1e-7 as KgCoOp's."""
    cosines = F.cosine_similarity(text_features.float(), reference_features.float(), dim=-1, eps=1e-7)
    return 1.0 - cosines.mean()


def kgcoop_loss(output, targets, reference_features, weight, alpha=0.0):
    """KgCoOp's objective for a ClassifierOutput: cross-entropy (plus alpha x the mask penalty when
    a RAda head made the logits) + weight x knowledge_gap of its class features."""
    penalty = knowledge_gap(output.text_features, reference_features)
    return rada_loss(output.logits, output.mask, targets, alpha) + weight * penalty


# ---- ProGrad ---------------------------------------------------------------------------------------
def prograd_prompt_learner(cfg, backbone, classnames):
    """CoOp's prompt learner (TRAINER.COOP) initialised as ProGrad does. With
    TRAINER.PROGRAD.INIT_FROM_TEMPLATE the m words of the dataset's ProGrad template before the class
    name take the last m of the N_CTX context tokens and the first N_CTX - m start at zero: the
    prompt reads "X .. X <template words> <class>.", all N_CTX tokens learned. A template with a
    comma has one token more than words ("pet," is two tokens); that last token stays a fixed word
    before the class name, as in ProGrad. Without it: CoOp's initialisation."""
    if not cfg.TRAINER.PROGRAD.INIT_FROM_TEMPLATE:
        return coop_prompt_learner(cfg, backbone, classnames)
    coop = cfg.TRAINER.COOP
    template = prograd_template(cfg.DATASET.NAME)
    words = template.replace(" {}.", "")
    count = len(words.split(" "))
    if coop.N_CTX < count:
        raise UserFacingError(
            f"TRAINER.COOP.N_CTX is {coop.N_CTX}, fewer than the {count} words of ProGrad's template {template!r} "
            f"that TRAINER.PROGRAD.INIT_FROM_TEMPLATE puts in the context: set N_CTX to {count} or more."
        )
    zeros = coop.N_CTX - count
    # Written out, the "X" placeholders and the words tokenise to exactly N_CTX context tokens.
    learner = CoOpPromptLearner(backbone, classnames, ctx_init=" ".join(["X"] * zeros + [words]),
                                position=coop.CLASS_TOKEN_POSITION)
    with torch.no_grad():
        learner.ctx[:zeros].zero_()
    logger.info("ProGrad's context: %d zero vectors, then the tokens of %r", zeros, words)
    return learner


def zero_shot_logits(logit_scale, image_features, reference_features):
    """Zero-shot CLIP's logits s * f^ . e^_k (float32, no gradient) from the normalised image features
    (B, E) and the hand-written class features (K, E)."""
    with torch.no_grad():
        return clip_logits(logit_scale.exp().float(), image_features.float(), reference_features.float())


def distillation_loss(logits, teacher_logits, temperature):
    """ProGrad's KL term: mean_b sum_k -softmax(z_zs / T)_k log_softmax(z / T)_k T^2, the cross-entropy
    to the teacher's softened predictions (its gradient is that of KL(teacher || student)), in float32."""
    teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(teacher * log_student).sum(dim=-1).mean() * temperature**2


def project_conflicting(grad, guide, lam):
    """ProGrad's rule for one parameter tensor: `grad` where grad . guide >= 0, otherwise
    grad - lam * (grad . guide / ||guide||^2) guide. A non-finite dot product (an overflow under
    PREC amp) gives a non-finite result, so that the GradScaler skips the step as for any other."""
    dot = torch.sum(grad * guide)
    projected = grad - lam * (dot / guide.square().sum()) * guide
    return torch.where((dot >= 0) & torch.isfinite(dot), grad, projected)
