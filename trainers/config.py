"""Every config key this project adds to Dassl's defaults, with its typed default, and the rules
its values must follow, in one place.

`extend_cfg(cfg)` must run on Dassl's default config before any YAML is merged (yacs rejects
unknown keys, and a value whose type differs from the default's). Where a trainer needs another
value than the default, its YAML files under configs/trainers/<Trainer>/ say so.
`check_values(cfg)` applies VALUE_RULES (the valid range of each key) and, given the trainer's
precision node, the precision rule below. Only yacs is needed: usable and testable without Dassl.

Precision: CLIP's precision is the PREC key of the trainer's family node, TRAINER.<node>.PREC,
`node` being the prec_node its declaration names (trainers/model/compositions.py; COOP is CoOp's
own key, MAPLE MaPLe's). A PREC of another node that differs from its default would be ignored, so
it is an error.
"""

from yacs.config import CfgNode as CN

from .errors import UserFacingError
from .model.image_resize import RESIZE_MODES

PRECISIONS = ("fp16", "fp32", "amp")
PREC_NODES = ("COOP", "RADA", "MAPLE", "ADAPTER", "FT", "COCOOP", "LORA", "IVLP", "VPT", "PROMPTSRC")
OBJECTIVES = ("ce", "flyp")  # TRAINER.FT.OBJECTIVE
ATTENTION_IMPLS = ("auto", "blocked", "fused")  # TRAINER.RADA.ATTENTION_IMPL, as trainers/model/rada_head.py has them
PREPROCESS_SOURCES = ("auto", "backbone", "config")  # INPUT.PREPROCESS
# TRAINER.LORA's choices, CLIP-LoRA's names (trainers/model/lora.py says what each selects).
LORA_ENCODERS = ("text", "vision", "both")
LORA_POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3")
LORA_PROJECTIONS = ("q", "k", "v", "o")


def extend_cfg(cfg):
    # Reproducible GPU runs: deterministic cuDNN and torch algorithms (no cudnn.benchmark), cuBLAS's
    # reproducible workspace, and the RAda head's blocked attention on CUDA; slower. CPU runs are
    # reproducible either way.
    cfg.DETERMINISTIC = False
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all, base or new (CoOp's base-to-new protocol)
    # MODEL.BACKBONE.NAME: an OpenAI CLIP name (ViT-B/16, RN50, ...) or checkpoint file,
    # "open_clip:ARCH/PRETRAINED", "open_clip:hf-hub:ORG/NAME", "open_clip:local-dir:FOLDER" or
    # "open_clip:ARCH" with WEIGHTS, "hf:ORG/NAME" or "hf:FOLDER" for a transformers dual encoder
    # (see README, "Backbones").
    # Folder of downloaded weights; "" means $CLIP_CACHE_DIR or ~/.cache/clip (open_clip: its own
    # default caches, ~/.cache/clip and the Hugging Face cache; hf: the Hugging Face cache).
    cfg.MODEL.BACKBONE.CACHE_DIR = ""
    cfg.MODEL.BACKBONE.WEIGHTS = ""  # a local weights file for the architecture NAME names
    # How test (and validation) images are brought to INPUT.SIZE: "shortest" side then a centre crop
    # (Dassl's test transform; OpenAI CLIP), "squash" the whole image to the square (SigLIP),
    # "longest" side then black padding, or "auto": the backbone's own mode (trainers/model/image_resize.py).
    # Training augmentation is Dassl's (INPUT.TRANSFORMS) whatever this says.
    cfg.INPUT.RESIZE_MODE = "auto"
    # Whose image preprocessing a run uses: "backbone" sets INPUT.SIZE, PIXEL_MEAN, PIXEL_STD and
    # INTERPOLATION to the backbone's own, whatever the config says (the log names what changed);
    # "config" uses the config's values as they are (a size the model does not take is an error);
    # "auto" is "config" for OpenAI CLIP (a MODEL.BACKBONE.NAME without "open_clip:" or "hf:"), whose
    # preprocessing the shipped configs carry, and "backbone" for every other backbone.
    # INPUT.RESIZE_MODE "auto" is the backbone's under each (trainers/model/backbones/__init__.py).
    cfg.INPUT.PREPROCESS = "auto"

    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 16  # number of context tokens
    cfg.TRAINER.COOP.CSC = False  # class-specific context
    cfg.TRAINER.COOP.CTX_INIT = ""  # initialise the context from these words, e.g. "a photo of a"
    cfg.TRAINER.COOP.PREC = "fp16"  # fp16, fp32 or amp
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end, middle or front

    cfg.TRAINER.RADA = CN()
    # Weight of the L-infinity pull of the mask towards 1. The authors default to 0 and the
    # value behind the paper's numbers is not published.
    cfg.TRAINER.RADA.ALPHA = 0.0
    cfg.TRAINER.RADA.TEMP = 1.0  # temperature of the global softmax
    cfg.TRAINER.RADA.NUM_HEADS = 8
    # The head's attention: "fused" (PyTorch's fused attention kernel), "blocked" (a loop of small
    # blocks, any device) or "auto" (fused where this torch has the kernel, but blocked on CUDA
    # under DETERMINISTIC; see rada_head.py).
    cfg.TRAINER.RADA.ATTENTION_IMPL = "auto"
    cfg.TRAINER.RADA.PREC = "fp16"  # precision of CLIP in the RAda trainer (the head is fp32)
    # Hand-crafted prompt of the RAda trainer; "" picks CoOp's per-dataset zero-shot template.
    cfg.TRAINER.RADA.TEMPLATE = "a photo of a {}."

    # MaPLe (and RAdaMaPLe): coupled vision-language prompts; MaPLe's own keys and defaults.
    cfg.TRAINER.MAPLE = CN()
    cfg.TRAINER.MAPLE.N_CTX = 2  # learned context tokens per prompted layer (text; vision coupled)
    # The first N_CTX tokens of these words initialise the context; the rest stay fixed words of
    # the prompt ("" for a random context).
    cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"
    cfg.TRAINER.MAPLE.PREC = "fp16"  # fp16, fp32 or amp
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # layers of each encoder given prompts; 1 = the input only

    # IVLP (and RAdaIVLP): independent deep text and vision prompts; the authors' keys and defaults
    # (their configs set depth 12/12 with 2+2 tokens, PromptSRC's 9/9 with 4+4).
    cfg.TRAINER.IVLP = CN()
    cfg.TRAINER.IVLP.N_CTX_VISION = 2  # learned tokens per prompted vision layer
    cfg.TRAINER.IVLP.N_CTX_TEXT = 2  # learned tokens per prompted text layer
    # The first N_CTX_TEXT tokens of these words initialise the text context, the rest stay fixed words
    # ("" or N_CTX_TEXT > 4: a random context, as the authors' code).
    cfg.TRAINER.IVLP.CTX_INIT = "a photo of a"
    cfg.TRAINER.IVLP.PREC = "fp16"  # fp16, fp32 or amp
    cfg.TRAINER.IVLP.PROMPT_DEPTH_VISION = 9  # vision layers given prompts; 1 = the input only, 0 = none
    cfg.TRAINER.IVLP.PROMPT_DEPTH_TEXT = 9  # text layers given prompts; 1 = the input only

    # PromptSRC (and RAdaPromptSRC): IVLP's prompts with the self-regulating losses and Gaussian prompt
    # aggregation; the authors' keys and defaults (muzairkhattak/PromptSRC train.py).
    cfg.TRAINER.PROMPTSRC = CN()
    cfg.TRAINER.PROMPTSRC.N_CTX_VISION = 4  # learned tokens per prompted vision layer
    cfg.TRAINER.PROMPTSRC.N_CTX_TEXT = 4  # learned tokens per prompted text layer
    cfg.TRAINER.PROMPTSRC.CTX_INIT = "a photo of a"  # as TRAINER.IVLP.CTX_INIT
    cfg.TRAINER.PROMPTSRC.PREC = "fp16"  # fp16, fp32 or amp
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION = 9  # vision layers given prompts; 1 = the input only, 0 = none
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT = 9  # text layers given prompts; 1 = the input only
    cfg.TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT = 25.0  # weight of L1(prompted text features, teacher's)
    cfg.TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT = 10.0  # weight of L1(prompted image features, teacher's)
    # GPA: epoch a's prompts weighted by the Gaussian pdf N(a; GPA_MEAN, GPA_STD), normalised over the epochs.
    cfg.TRAINER.PROMPTSRC.GPA_MEAN = 15.0
    cfg.TRAINER.PROMPTSRC.GPA_STD = 1.0

    # VPT (deep vision prompts only; the text is the fixed "a photo of a {}."); the authors' keys.
    cfg.TRAINER.VPT = CN()
    cfg.TRAINER.VPT.N_CTX_VISION = 2  # learned tokens per prompted vision layer
    cfg.TRAINER.VPT.CTX_INIT = ""  # unused, as in the authors' code (kept so their configs load)
    # The authors' code runs CLIP in float32 whatever their configs' PREC says; so does this default.
    cfg.TRAINER.VPT.PREC = "fp32"
    cfg.TRAINER.VPT.PROMPT_DEPTH_VISION = 1  # vision layers given prompts; 1 = the input only

    # CoCoOp (and RAdaCoCoOp): CoOp's context shifted per image by a meta-net; CoCoOp's own keys and defaults.
    cfg.TRAINER.COCOOP = CN()
    cfg.TRAINER.COCOOP.N_CTX = 16  # number of context tokens (ignored with CTX_INIT: its words set it)
    cfg.TRAINER.COCOOP.CTX_INIT = ""  # initialise the context from these words, e.g. "a photo of a"
    cfg.TRAINER.COCOOP.PREC = "fp16"  # fp16, fp32 or amp

    # KgCoOp and RAdaKgCoOp: CoOp's context (TRAINER.COOP's keys and precision, which KgCoOp's code reads
    # too) plus W x (1 - mean cosine between the prompted and the hand-written class features).
    # KgCoOp's CTX_INIT True stands for "a photo of a", which its configs here write out.
    cfg.TRAINER.KGCOOP = CN()
    cfg.TRAINER.KGCOOP.W = 1.0  # KgCoOp's default; its scripts and the configs here use 8.0

    # ProGrad and RAdaProGrad: CoOp's context (TRAINER.COOP's keys and precision, as ProGrad's code) moved
    # along the cross-entropy gradient, its component against the zero-shot distillation gradient removed.
    cfg.TRAINER.PROGRAD = CN()
    cfg.TRAINER.PROGRAD.LAMBDA = 1.0  # share of the conflicting component removed: 0 is CoOp's step (LOSS.LAMBDA)
    cfg.TRAINER.PROGRAD.T = 1.0  # temperature of the distillation loss (ProGrad's LOSS.T)
    # ProGrad's CTX_INIT True: the words of its template for the dataset fill the last context tokens,
    # zeros the first (TRAINER.COOP.CTX_INIT must then be empty).
    cfg.TRAINER.PROGRAD.INIT_FROM_TEMPLATE = False

    # CLIPAdapter and RAdaAdapter: residual bottleneck adapters on the image and text features.
    cfg.TRAINER.ADAPTER = CN()
    cfg.TRAINER.ADAPTER.REDUCTION = 4  # bottleneck width = feature width // REDUCTION
    # Residual ratio r: features become (1 - r) * f + r * A(f). 0.2 is CLIP-Adapter's; the RAdaAdapter
    # configs set 0.5 (after the L2 normalisation exactly the RAda authors' f + A(f)).
    cfg.TRAINER.ADAPTER.RATIO = 0.2
    # Adapt the text features too. CLIP-Adapter adapts only the image features; the RAdaAdapter
    # configs set True (the RAda authors adapt both).
    cfg.TRAINER.ADAPTER.TEXT = False
    cfg.TRAINER.ADAPTER.PREC = "fp16"  # precision of CLIP; the adapters (and head) are fp32

    # CLIPLoRA and RAdaLoRA: CLIP-LoRA's low-rank updates of the attention projections of both towers
    # (trainers/model/lora.py), with CLIP-LoRA's names and defaults.
    cfg.TRAINER.LORA = CN()
    cfg.TRAINER.LORA.R = 2  # rank r
    cfg.TRAINER.LORA.ALPHA = 1.0  # the update is scaled by ALPHA / sqrt(R)
    cfg.TRAINER.LORA.DROPOUT = 0.25  # dropout on the input of each update
    cfg.TRAINER.LORA.POSITION = "all"  # which blocks: all, bottom, mid, up, half-bottom, half-up or top3
    cfg.TRAINER.LORA.ENCODER = "both"  # which towers: text, vision or both
    cfg.TRAINER.LORA.PARAMS = ["q", "k", "v"]  # which projections of each attention: q, k, v, o (output)
    # Training length: N_ITERS x DATASET.NUM_SHOTS optimiser steps (CLIP-LoRA's n_iters x shots), rounded
    # up to whole epochs, which replace OPTIM.MAX_EPOCH; 0 trains OPTIM.MAX_EPOCH epochs. The learning rate
    # falls from OPTIM.LR to MIN_LR along a cosine over the steps.
    cfg.TRAINER.LORA.N_ITERS = 500
    cfg.TRAINER.LORA.MIN_LR = 1e-6
    cfg.TRAINER.LORA.TEMPLATE = "a photo of a {}."  # CLIP-LoRA's prompt; "" picks CoOp's template of the dataset
    # Evaluate with each update merged into its weight (CLIP-LoRA's eval mode; the same logits to float
    # rounding, faster); False keeps the separate low-rank branch of training.
    cfg.TRAINER.LORA.MERGE_FOR_EVAL = True
    cfg.TRAINER.LORA.PREC = "amp"  # CLIP-LoRA: float16 autocast and loss scaling; the LoRA matrices are float32

    # Full fine-tuning (FT, FLYP, RAdaFT): CLIP's image encoder (and optionally its text encoder)
    # trained with AdamW-style OPTIM.*, weight decay only on weight matrices, a per-step schedule.
    cfg.TRAINER.FT = CN()
    cfg.TRAINER.FT.PREC = "amp"  # amp or fp32; fp16 becomes amp (never fp16 weights under an optimiser)
    # "ce": cross-entropy over the class prompts; "flyp": FLYP's contrastive loss between images and
    # class-name captions. The FLYP configs set flyp, a trained text encoder and logit scale.
    cfg.TRAINER.FT.OBJECTIVE = "ce"
    cfg.TRAINER.FT.TRAIN_TEXT_ENCODER = False  # False: frozen, its class features computed once
    cfg.TRAINER.FT.TRAIN_LOGIT_SCALE = False
    # Class prompts: a template set of trainers/model/prompts.py (e.g. "openai_imagenet", FLYP's 80), one
    # template with '{}', or "" for CoOp's zero-shot template of the dataset.
    cfg.TRAINER.FT.TEMPLATES = ""
    cfg.TRAINER.FT.HEAD_LR = 1e-4  # learning rate of the RAda head; the encoders use OPTIM.LR
    # Linear warm-up over this many optimiser steps, then a cosine decay to 0 at the last step.
    cfg.TRAINER.FT.WARMUP_STEPS = 500
    cfg.TRAINER.FT.GRAD_CHECKPOINTING = False  # recompute the encoders' block activations in backward
    # Test sets of some of ImageNet's classes (ImageNet-A/-R, ObjectNet): True classifies over all
    # ImageNet classes and keeps the logits of the set's classes (WiSE-FT, FLYP); False classifies
    # over the set's own class names (CoOp).
    cfg.TRAINER.FT.IMAGENET_SUBSET_EVAL = True

    # Test-time training (RAdaTTT, RAdaCoOpTTT), TPT's protocol: per test image the original and
    # N_VIEWS random views, the CONFIDENT_FRACTION of them with the lowest entropy kept, STEPS
    # steps on the entropy of their averaged prediction, then the original predicted and the
    # model reset. The optimiser is OPTIM.* (the shipped configs: AdamW, lr 5e-3, as TPT).
    cfg.TRAINER.TTT = CN()
    cfg.TRAINER.TTT.STEPS = 1  # optimiser steps per test image; 0 predicts without adapting
    cfg.TRAINER.TTT.N_VIEWS = 63  # random views per image besides the original (TPT: batch of 64)
    cfg.TRAINER.TTT.CONFIDENT_FRACTION = 0.1  # share of the 1 + N_VIEWS predictions kept (6 of 64)
    # AugMix on the views. TPT: off for ImageNet and its variants (random resized crops and flips
    # only), on for the other datasets; the shipped configs follow it.
    cfg.TRAINER.TTT.AUGMIX = False
    cfg.TRAINER.TTT.ADAPT_PROMPTS = False  # also adapt the CoOp context (RAdaCoOpTTT); the head always adapts
    return cfg


class Interval:
    """Numbers from `low` to `high` (None: unbounded), each end open or closed; whole numbers only
    with `integer`. Booleans are not numbers here."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False, integer=False):
        self.low, self.high, self.low_open, self.high_open, self.integer = low, high, low_open, high_open, integer

    def holds(self, value):
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self):
        kind = "a whole number" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


class SubsetOf:
    """A non-empty list of distinct choices."""

    def __init__(self, *choices):
        self.choices = choices

    def holds(self, value):
        return (isinstance(value, (list, tuple)) and len(value) > 0 and len(set(value)) == len(value)
                and all(item in self.choices for item in value))

    def __str__(self):
        return f"a non-empty list of distinct items of {', '.join(map(str, self.choices))}"


class OneOf:
    def __init__(self, *choices):
        self.choices = choices

    def holds(self, value):
        return value in self.choices

    def __str__(self):
        return f"one of {', '.join(map(str, self.choices))}"


# The valid values of each key, Dassl's and ours. check_values skips keys a host program lacks.
VALUE_RULES = (
    ("DATALOADER.TRAIN_X.BATCH_SIZE", Interval(1, integer=True)),
    ("DATALOADER.TEST.BATCH_SIZE", Interval(1, integer=True)),
    ("DATALOADER.NUM_WORKERS", Interval(0, integer=True)),
    ("OPTIM.LR", Interval(0)),
    ("DATASET.SUBSAMPLE_CLASSES", OneOf("all", "base", "new")),
    ("INPUT.RESIZE_MODE", OneOf("auto", *RESIZE_MODES)),
    ("INPUT.PREPROCESS", OneOf(*PREPROCESS_SOURCES)),
    *((f"TRAINER.{node}.PREC", OneOf(*PRECISIONS)) for node in PREC_NODES),
    ("TRAINER.COOP.CLASS_TOKEN_POSITION", OneOf("end", "middle", "front")),
    ("TRAINER.COCOOP.N_CTX", Interval(1, integer=True)),
    ("TRAINER.IVLP.N_CTX_VISION", Interval(0, integer=True)),
    ("TRAINER.IVLP.N_CTX_TEXT", Interval(1, integer=True)),
    # and at most the encoder's number of layers (checked where the prompts are built)
    ("TRAINER.IVLP.PROMPT_DEPTH_VISION", Interval(0, integer=True)),
    ("TRAINER.IVLP.PROMPT_DEPTH_TEXT", Interval(1, integer=True)),
    ("TRAINER.PROMPTSRC.N_CTX_VISION", Interval(0, integer=True)),
    ("TRAINER.PROMPTSRC.N_CTX_TEXT", Interval(1, integer=True)),
    ("TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", Interval(0, integer=True)),
    ("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", Interval(1, integer=True)),
    ("TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT", Interval(0)),
    ("TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT", Interval(0)),
    ("TRAINER.PROMPTSRC.GPA_STD", Interval(0, low_open=True)),
    ("TRAINER.VPT.N_CTX_VISION", Interval(1, integer=True)),
    ("TRAINER.VPT.PROMPT_DEPTH_VISION", Interval(1, integer=True)),
    ("TRAINER.KGCOOP.W", Interval(0)),
    ("TRAINER.PROGRAD.LAMBDA", Interval(0, 1)),
    ("TRAINER.PROGRAD.T", Interval(0, low_open=True)),
    ("TRAINER.RADA.ALPHA", Interval(0)),
    ("TRAINER.RADA.TEMP", Interval(0, low_open=True)),
    ("TRAINER.RADA.NUM_HEADS", Interval(1, integer=True)),  # and a divisor of the feature width
    ("TRAINER.RADA.ATTENTION_IMPL", OneOf(*ATTENTION_IMPLS)),
    ("TRAINER.ADAPTER.REDUCTION", Interval(1, integer=True)),
    ("TRAINER.ADAPTER.RATIO", Interval(0, 1, low_open=True)),
    ("TRAINER.LORA.R", Interval(1, integer=True)),
    ("TRAINER.LORA.ALPHA", Interval(0, low_open=True)),
    ("TRAINER.LORA.DROPOUT", Interval(0, 1, high_open=True)),
    ("TRAINER.LORA.POSITION", OneOf(*LORA_POSITIONS)),
    ("TRAINER.LORA.ENCODER", OneOf(*LORA_ENCODERS)),
    ("TRAINER.LORA.PARAMS", SubsetOf(*LORA_PROJECTIONS)),
    ("TRAINER.LORA.N_ITERS", Interval(0, integer=True)),
    ("TRAINER.LORA.MIN_LR", Interval(0)),
    ("TRAINER.FT.OBJECTIVE", OneOf(*OBJECTIVES)),
    ("TRAINER.FT.HEAD_LR", Interval(0, low_open=True)),
    ("TRAINER.FT.WARMUP_STEPS", Interval(0, integer=True)),
    ("TRAINER.TTT.STEPS", Interval(0, integer=True)),
    ("TRAINER.TTT.N_VIEWS", Interval(0, integer=True)),
    ("TRAINER.TTT.CONFIDENT_FRACTION", Interval(0, 1, low_open=True)),
)


def _lookup(cfg, key):
    """The value of a dotted key, or KeyError when the config lacks it."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def widen_whole_numbers(cfg, opts):
    """KEY VALUE overrides with a whole number given for a float key written as a float (yacs
    refuses `OPTIM.LR 1` or `TRAINER.RADA.TEMP 0` as an int where the default is a float)."""
    widened = list(opts)
    for position in range(0, len(widened) - 1, 2):
        try:
            default = _lookup(cfg, widened[position])
        except KeyError:
            continue  # yacs names the unknown key
        value = CN._decode_cfg_value(widened[position + 1])
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            widened[position + 1] = repr(float(value))
    return widened


def rule_of(key):
    """The rule of VALUE_RULES for a key, or None."""
    return dict(VALUE_RULES).get(key)


def dassl_nodes():
    """An empty config with the nodes of Dassl's config that extend_cfg adds keys to."""
    skeleton = CN()
    skeleton.DATASET = CN()
    skeleton.INPUT = CN()
    skeleton.MODEL = CN()
    skeleton.MODEL.BACKBONE = CN()
    skeleton.TRAINER = CN()
    return skeleton


def defaults():
    """Our keys at their defaults (without Dassl's)."""
    return extend_cfg(dassl_nodes())


def check_values(cfg, prec_node=None):
    """Raise UserFacingError naming every key whose value breaks its rule in VALUE_RULES, and, with
    the precision node of the trainer, every PREC it would ignore (see the module docstring)."""
    problems = []
    for key, rule in VALUE_RULES:
        try:
            value = _lookup(cfg, key)
        except KeyError:
            continue
        if not rule.holds(value):
            problems.append(f"{key} is {value!r}; it must be {rule}")
    if prec_node is not None:
        default = defaults()
        ignored = [
            f"TRAINER.{node}.PREC" for node in PREC_NODES
            if node != prec_node and cfg.TRAINER.get(node, {}).get("PREC") != default.TRAINER[node].PREC
        ]
        if ignored:
            problems.append(
                f"{cfg.TRAINER.NAME} takes CLIP's precision from TRAINER.{prec_node}.PREC and would ignore "
                f"{' and '.join(ignored)} (set away from its default): set TRAINER.{prec_node}.PREC instead"
            )
    if problems:
        raise UserFacingError("; ".join(problems) + ".")
