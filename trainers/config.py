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
    return cfg
