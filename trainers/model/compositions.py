"""What each trainer is made of, as data, and the one function that builds its model.

A trainer's model is a CLIPClassifier: the backbone's encoders, a prompt source for the class
texts, optionally a feature adapter and the RAda head. A Composition names those pieces, the
modules the trainer trains (each gets an optimiser and a checkpoint folder), the config node whose
PREC sets CLIP's precision, and whether it learns prompt embeddings. The Dassl trainers
(trainers/*_trainers.py) add behaviour only (the fine-tuning objective, test-time training);
bench/gpu_check.py, scripts/visualize.py and the tests build models through `build_classifier`.

A new method on existing pieces adds its prompt source to PROMPT_SOURCES (if new), one entry to
COMPOSITIONS and its YAML configs.
"""

import functools
import logging
from dataclasses import dataclass

from ..errors import UserFacingError
from .adapters import FeatureAdapter
from .classifier import CLIPClassifier
from .cocoop import cocoop_prompt_learner
from .finetune import LogitScale, finetune_precision
from .guided_prompts import prograd_prompt_learner
from .ivlp import ivlp_prompt_learner, vpt_prompts
from .lora import build_lora
from .maple import MaPLeClassifier, maple_prompt_learner
from .prompts import FixedPrompts, coop_prompt_learner, resolve_templates, zero_shot_template
from .rada_head import rada_head

logger = logging.getLogger(__name__)


# name -> (builder(cfg, backbone, classnames) -> prompt source, classifier class, learns prompt embeddings);
# "fixed" has no builder: hand-crafted prompts of the composition's template.
PROMPT_SOURCES = {
    "fixed": (None, CLIPClassifier, False),
    "coop": (coop_prompt_learner, CLIPClassifier, True),
    "maple": (maple_prompt_learner, MaPLeClassifier, True),
    "prograd": (prograd_prompt_learner, CLIPClassifier, True),  # CoOp's, initialised as ProGrad does
    "cocoop": (cocoop_prompt_learner, CLIPClassifier, True),
    "ivlp": (ivlp_prompt_learner, CLIPClassifier, True),
    "promptsrc": (functools.partial(ivlp_prompt_learner, node="PROMPTSRC"), CLIPClassifier, True),  # IVLP's
    "vpt": (vpt_prompts, CLIPClassifier, False),  # vision prompts; the text is fixed "a photo of a {}."
}

# The hand-crafted prompt of fixed prompts: name -> template(s) from the config.
TEMPLATES = {
    "dataset": lambda cfg: zero_shot_template(cfg.DATASET.NAME),  # CoOp's zero-shot prompt of the dataset
    "rada": lambda cfg: cfg.TRAINER.RADA.TEMPLATE or zero_shot_template(cfg.DATASET.NAME),
    "finetune": lambda cfg: resolve_templates(cfg.TRAINER.FT.TEMPLATES, cfg.DATASET.NAME),
    "lora": lambda cfg: cfg.TRAINER.LORA.TEMPLATE or zero_shot_template(cfg.DATASET.NAME),
}


@dataclass(frozen=True)
class Composition:
    """prompts: a key of PROMPT_SOURCES; template: a key of TEMPLATES (fixed prompts); head: the RAda
    head between features and logits; adapter: TRAINER.ADAPTER's feature adapter; trains: the
    registered modules, in order, of "prompt_learner", "lora", "adapter", "rada_head"; fine_tunes: the
    encoders train as TRAINER.FT says (image_encoder, text_encoder, logit_scale before rada_head);
    prec_node: CLIP's precision is TRAINER.<prec_node>.PREC; lora: CLIP-LoRA's low-rank updates
    (TRAINER.LORA) go into the towers before anything is frozen; trains names them "lora"."""

    prompts: str
    template: str = "dataset"
    head: bool = False
    adapter: bool = False
    trains: tuple = ()
    fine_tunes: bool = False
    prec_node: str = "COOP"
    lora: bool = False

    @property
    def learns_prompts(self):
        """Whether it learns prompt token embeddings, which needs a text tower that takes embeddings."""
        return PROMPT_SOURCES[self.prompts][2]

    def precision(self, cfg):
        """The PREC CLIP runs in; fine-tuning never puts fp16 weights under an optimiser."""
        requested = cfg.TRAINER[self.prec_node].PREC
        return finetune_precision(requested) if self.fine_tunes else requested


RADA = Composition("fixed", template="rada", head=True, trains=("rada_head",), prec_node="RADA")
RADA_COOP = Composition("coop", head=True, trains=("prompt_learner", "rada_head"))
FINE_TUNING = Composition("fixed", template="finetune", fine_tunes=True, prec_node="FT")

# One declaration per registered trainer (test-time trainers adapt the model of the trainer they name).
COMPOSITIONS = {
    "ZeroshotCLIP": Composition("fixed"),
    "CoOp": Composition("coop", trains=("prompt_learner",)),
    "RAda": RADA,
    "RAdaCoOp": RADA_COOP,
    "MaPLe": Composition("maple", trains=("prompt_learner",), prec_node="MAPLE"),
    "RAdaMaPLe": Composition("maple", head=True, trains=("prompt_learner", "rada_head"), prec_node="MAPLE"),
    "IVLP": Composition("ivlp", trains=("prompt_learner",), prec_node="IVLP"),
    "RAdaIVLP": Composition("ivlp", head=True, trains=("prompt_learner", "rada_head"), prec_node="IVLP"),
    "VPT": Composition("vpt", trains=("prompt_learner",), prec_node="VPT"),
    "PromptSRC": Composition("promptsrc", trains=("prompt_learner",), prec_node="PROMPTSRC"),
    "RAdaPromptSRC": Composition("promptsrc", head=True, trains=("prompt_learner", "rada_head"),
                                 prec_node="PROMPTSRC"),
    "CoCoOp": Composition("cocoop", trains=("prompt_learner",), prec_node="COCOOP"),
    "RAdaCoCoOp": Composition("cocoop", head=True, trains=("prompt_learner", "rada_head"), prec_node="COCOOP"),
    "KgCoOp": Composition("coop", trains=("prompt_learner",)),
    "RAdaKgCoOp": RADA_COOP,
    "ProGrad": Composition("prograd", trains=("prompt_learner",)),
    "RAdaProGrad": Composition("prograd", head=True, trains=("prompt_learner", "rada_head")),
    "CLIPAdapter": Composition("fixed", adapter=True, trains=("adapter",), prec_node="ADAPTER"),
    "RAdaAdapter": Composition("fixed", template="rada", head=True, adapter=True, trains=("adapter", "rada_head"),
                               prec_node="ADAPTER"),
    "FT": FINE_TUNING,
    "FLYP": FINE_TUNING,
    "RAdaFT": Composition("fixed", template="finetune", head=True, fine_tunes=True, trains=("rada_head",),
                          prec_node="FT"),
    "RAdaTTT": RADA,
    "RAdaCoOpTTT": RADA_COOP,
    "CLIPLoRA": Composition("fixed", template="lora", lora=True, trains=("lora",), prec_node="LORA"),
    "RAdaLoRA": Composition("fixed", template="lora", head=True, lora=True, trains=("lora", "rada_head"),
                            prec_node="LORA"),
}


def composition_of(trainer):
    if trainer not in COMPOSITIONS:
        raise UserFacingError(f"No composition is declared for trainer {trainer!r}; declared: {', '.join(COMPOSITIONS)}.")
    return COMPOSITIONS[trainer]


def check_backbone_supports(composition, trainer, backbone, trainers):
    """A trainer that learns prompt embeddings needs a text tower that takes them; the error names
    those of `trainers` (the registered ones) that run on this backbone."""
    if not composition.learns_prompts or backbone.text_encoder.takes_embeddings:
        return
    supported = [name for name in trainers if name in COMPOSITIONS and not COMPOSITIONS[name].learns_prompts]
    raise UserFacingError(
        f"{trainer} learns prompt embeddings, which is not supported for this backbone "
        f"({backbone.name}: its text tower takes token ids only). Trainers supported on it: {', '.join(supported)}."
    )


def build_adapter(cfg, width):
    adapter = cfg.TRAINER.ADAPTER
    if width // adapter.REDUCTION < 1:
        raise UserFacingError(
            f"TRAINER.ADAPTER.REDUCTION {adapter.REDUCTION} leaves no hidden unit for features of width {width}."
        )
    logger.info(
        "Adapters on the image%s features: width %d -> %d -> %d, residual ratio %s",
        " and text" if adapter.TEXT else "", width, width // adapter.REDUCTION, width, adapter.RATIO,
    )
    return FeatureAdapter(width, adapter.REDUCTION, ratio=adapter.RATIO, adapt_text=adapter.TEXT)


def build_classifier(composition, cfg, backbone, classnames):
    """(classifier, {registered name: trained module}) of `composition` on a Backbone, for
    `classnames`: CLIP's weights frozen, the trained modules' parameters requiring gradients."""
    make_prompts, classifier_class, _ = PROMPT_SOURCES[composition.prompts]
    if make_prompts is None:
        prompts = FixedPrompts(classnames, TEMPLATES[composition.template](cfg))
    else:
        prompts = make_prompts(cfg, backbone, classnames)
    width = backbone.embed_dim
    lora = build_lora(cfg, backbone) if composition.lora else None
    model = classifier_class(
        backbone, prompts,
        head=rada_head(cfg, width) if composition.head else None,
        adapter=build_adapter(cfg, width) if composition.adapter else None,
    )
    pieces = {"prompt_learner": model.prompts, "adapter": model.adapter, "rada_head": model.head, "lora": lora}
    trained = _fine_tuned_modules(cfg, model) if composition.fine_tunes else {}
    trained.update({name: pieces[name] for name in composition.trains})
    model.requires_grad_(False)
    for module in trained.values():
        module.requires_grad_(True)
    return model, trained


def _fine_tuned_modules(cfg, model):
    ft = cfg.TRAINER.FT
    if ft.GRAD_CHECKPOINTING:
        if not model.backbone.checkpoint_blocks("image"):
            logger.warning("Gradient checkpointing covers transformer blocks; the %s image encoder runs as usual",
                           model.backbone.vision_kind())
        if ft.TRAIN_TEXT_ENCODER:
            model.backbone.checkpoint_blocks("text")
    logger.info(
        "Fine-tuning with the %s objective: image encoder trained, text encoder %s, logit scale %s, %s",
        ft.OBJECTIVE, "trained" if ft.TRAIN_TEXT_ENCODER else "frozen (class features cached)",
        "trained" if ft.TRAIN_LOGIT_SCALE else "fixed", "RAda head" if model.head is not None else "no head",
    )
    modules = {"image_encoder": model.image_encoder}
    if ft.TRAIN_TEXT_ENCODER:
        modules["text_encoder"] = model.text_encoder
    if ft.TRAIN_LOGIT_SCALE:
        modules["logit_scale"] = LogitScale(model.logit_scale)
    return modules
