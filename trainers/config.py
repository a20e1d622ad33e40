"""Every config key this project adds to Dassl's defaults, with its default, in one place.

`extend_cfg(cfg)` must run on Dassl's default config before any YAML is merged (yacs
rejects unknown keys). It needs only yacs, so it is usable and testable without Dassl.
"""

from yacs.config import CfgNode as CN


def extend_cfg(cfg):
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all, base or new (CoOp's base-to-new protocol)
    # Folder of downloaded CLIP weights; "" means $CLIP_CACHE_DIR or ~/.cache/clip.
    cfg.MODEL.BACKBONE.CACHE_DIR = ""

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

    # CLIPAdapter and RAdaAdapter: residual bottleneck adapters on the image and text features.
    cfg.TRAINER.ADAPTER = CN()
    cfg.TRAINER.ADAPTER.REDUCTION = 4  # bottleneck width = feature width // REDUCTION
    # Residual ratio r: features become (1 - r) * f + r * A(f). None takes the trainer's own:
    # CLIPAdapter 0.2 (CLIP-Adapter's), RAdaAdapter 0.5 (after the L2 normalisation exactly the
    # RAda authors' f + A(f)).
    cfg.TRAINER.ADAPTER.RATIO = None
    # Adapt the text features too. None takes the trainer's own: CLIPAdapter False (CLIP-Adapter
    # adapts only the image features), RAdaAdapter True (the RAda authors adapt both).
    cfg.TRAINER.ADAPTER.TEXT = None
    cfg.TRAINER.ADAPTER.PREC = "fp16"  # precision of CLIP; the adapters (and head) are fp32

    # Full fine-tuning (FT, FLYP, RAdaFT): CLIP's image encoder (and optionally its text encoder)
    # trained with AdamW-style OPTIM.*, weight decay only on weight matrices, a per-step schedule.
    cfg.TRAINER.FT = CN()
    cfg.TRAINER.FT.PREC = "amp"  # amp or fp32; fp16 becomes amp (never fp16 weights under an optimiser)
    # "ce": cross-entropy over the class prompts; "flyp": FLYP's contrastive loss between images and
    # class-name captions. None takes the trainer's own: FT and RAdaFT "ce", FLYP "flyp".
    cfg.TRAINER.FT.OBJECTIVE = None
    cfg.TRAINER.FT.TRAIN_TEXT_ENCODER = None  # None: the trainer's own (FLYP True, FT and RAdaFT False)
    cfg.TRAINER.FT.TRAIN_LOGIT_SCALE = None  # None: trained exactly under the flyp objective (as FLYP)
    # Class prompts: a template set of trainers/core/prompts.py (e.g. "openai_imagenet", FLYP's 80), one
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
