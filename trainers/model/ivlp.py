"""IVLP (independent deep vision-language prompts) and VPT-deep (deep vision prompts only), the
baselines of MaPLe's and PromptSRC's papers, on the backbone's own towers.

Text tower (IVLP), n = N_CTX_TEXT, depth Jt = PROMPT_DEPTH_TEXT (>= 1):
- First layer: "[SOS] c_1 .. c_n <rest of CTX_INIT> <class>. [EOS]". With CTX_INIT words and n <= 4 the
  context starts as the embeddings of their first n tokens and the remaining words stay fixed tokens
  (2 ctx of "a photo of a": "a photo" learned, "of a" fixed); otherwise (no words, or n > 4, the
  authors' rule) it starts N(0, 0.02^2) written "X X .. X". Positional embeddings are added to the
  whole first-layer sequence.
- Blocks 1 .. Jt-1 each own n tokens that replace positions 1 .. n of their input (what the previous
  block produced there); deeper blocks see the previous output unchanged. No positional embedding
  is added to deep prompts.

Vision tower (IVLP and VPT), m = N_CTX_VISION, depth Jv = PROMPT_DEPTH_VISION:
- First layer: m tokens appended after the class and patch tokens, after the positional embedding
  and before `ln_pre`. Blocks 1 .. Jv-1 each own m tokens that replace the last m positions of
  their input. Jv = 0 (IVLP only): no vision prompts at all.
- VPT's text side is fixed: "a photo of a {}." encoded by the frozen text tower (FixedPrompts).

Every prompt is a float32 parameter, N(0, 0.02^2) unless initialised from words, cast to CLIP's
precision where it enters the sequence. (The authors keep `ctx` in CLIP's dtype, fp16 under PREC
fp16, and round every inserted prompt through fp16 even under fp32/amp; here the prompts are float32
master weights and fp32 runs keep them in float32, as this project's MaPLe does.)

The insertions are forward pre-hooks that exist only while a prompted encoder call runs
(trainers/model/deep_prompts.py); the backbone names the sites (`Backbone.text_prompt_sites` /
`vision_prompt_sites`).

Parameter names and the authors' whole-model checkpoint keys (MaPLe repository's
clip/model.py and trainers/independentVL.py, vpt.py), block index i kept as the dictionary key:

    ctx                       <- prompt_learner.ctx
    VPT                       <- image_encoder.VPT
    vision_VPT_shallow.<i>    <- image_encoder.transformer.resblocks.<i>.VPT_shallow
    text_VPT_shallow.<i>      <- text_encoder.transformer.resblocks.<i>.VPT_shallow   (IVLP only)
"""

import logging

import torch
from torch import nn

from ..errors import UserFacingError
from .backbones import as_backbone
from .deep_prompts import appended_tokens, deep_prompts
from .prompts import (
    DEFAULT_TEMPLATE,
    FixedPrompts,
    LearnedContext,
    check_init_words,
    context_words,
    initial_context,
)

logger = logging.getLogger(__name__)

# The authors initialise the text context from CTX_INIT only up to this many tokens.
MAX_WORD_INIT_TOKENS = 4


def _random_prompts(n_tokens, width):
    return nn.Parameter(torch.empty(n_tokens, width).normal_(std=0.02))


def _check_depth(key, depth, lowest, layers, lowest_means):
    if not lowest <= depth <= layers:
        raise UserFacingError(
            f"{key} is {depth}; it must be between {lowest} ({lowest_means}) and {layers}, the number of "
            "layers of this CLIP's encoder."
        )


def _deep_block_prompts(n_tokens, width, depth):
    """One (n_tokens, width) prompt per block 1 .. depth-1, keyed by the block's index."""
    return nn.ParameterDict({str(block): _random_prompts(n_tokens, width) for block in range(1, depth)})


class DeepVisionPromptsMixin:
    """The vision side of IVLP and VPT: `VPT` (first layer, appended) and `vision_VPT_shallow` (blocks
    1 .. depth-1, replacing the last tokens). The class sets `vision_sites` and `vision_depth`."""

    def _init_vision_prompts(self, backbone, n_ctx, depth, key_prefix, lowest_depth):
        self.vision_depth, self.n_ctx_vision = depth, n_ctx
        if depth == 0 or n_ctx == 0:
            self.vision_sites, self.VPT, self.vision_VPT_shallow = None, None, nn.ParameterDict()
            return
        self.vision_sites = backbone.vision_prompt_sites()
        _check_depth(f"{key_prefix}.PROMPT_DEPTH_VISION", depth, lowest_depth, len(self.vision_sites.blocks),
                     "no vision prompts" if lowest_depth == 0 else "prompts in the input only")
        self.VPT = _random_prompts(n_ctx, backbone.vision_width)
        self.vision_VPT_shallow = _deep_block_prompts(n_ctx, backbone.vision_width, depth)

    def encode_image(self, image_encoder, images):
        """Image features (B, E) through the prompted image encoder."""
        if self.VPT is None:
            return image_encoder(images)
        sites = self.vision_sites
        with appended_tokens(sites.stem, self.VPT), deep_prompts(
            sites.blocks, list(self.vision_VPT_shallow.values()), start=-self.n_ctx_vision,
            batch_first=sites.batch_first,
        ):
            return image_encoder(images)


class IVLPPromptLearner(DeepVisionPromptsMixin, LearnedContext):
    """IVLP's independent text and vision prompts; see the module docstring for the layout.

    forward(text_encoder) returns the K class text features; encode_image(image_encoder, images) the
    prompted image features. Class-name buffers are not persistent: checkpoints hold only what is learned.
    """

    def __init__(self, backbone, classnames, n_ctx_text=2, n_ctx_vision=2, ctx_init="a photo of a",
                 depth_text=9, depth_vision=9, key_prefix="TRAINER.IVLP"):
        backbone = as_backbone(backbone)
        text_sites = backbone.text_prompt_sites()
        _check_depth(f"{key_prefix}.PROMPT_DEPTH_TEXT", depth_text, 1, len(text_sites.blocks),
                     "prompts in the input only")
        if n_ctx_text < 1:
            raise UserFacingError(f"{key_prefix}.N_CTX_TEXT is {n_ctx_text}; it must be at least 1.")
        ctx_init = context_words(ctx_init)
        if ctx_init and n_ctx_text > MAX_WORD_INIT_TOKENS:
            logger.info("IVLP: %d text context tokens (more than %d): random initialisation, CTX_INIT %r unused",
                        n_ctx_text, MAX_WORD_INIT_TOKENS, ctx_init)
            ctx_init = ""
        check_init_words(backbone, ctx_init, n_ctx_text, f"{key_prefix}.N_CTX_TEXT")
        ctx, prefix_text = initial_context(backbone, ctx_init, n_ctx_text, (n_ctx_text, backbone.text_width))
        super().__init__(backbone, classnames, ctx, prefix_text)
        self.text_sites = text_sites
        self.text_VPT_shallow = _deep_block_prompts(n_ctx_text, backbone.text_width, depth_text)
        self._init_vision_prompts(backbone, n_ctx_vision, depth_vision, key_prefix, lowest_depth=0)
        logger.info("IVLP prompts: text %d tokens initialised as %r, depth %d; vision %d tokens, depth %d",
                    n_ctx_text, prefix_text, depth_text, n_ctx_vision, depth_vision)

    def forward(self, text_encoder):
        sites = self.text_sites
        with deep_prompts(sites.blocks, list(self.text_VPT_shallow.values()), sites.prompt_start,
                          sites.batch_first):
            return text_encoder(self.prompt_embeddings(), self.tokenized_prompts)


class VPTPrompts(DeepVisionPromptsMixin, nn.Module):
    """VPT-deep: learned vision prompts only; the class texts are the fixed "a photo of a {}."
    (FixedPrompts, encoded once by the frozen text tower and not saved)."""

    def __init__(self, backbone, classnames, n_ctx_vision=8, depth_vision=12, key_prefix="TRAINER.VPT"):
        super().__init__()
        backbone = as_backbone(backbone)
        if n_ctx_vision < 1:
            raise UserFacingError(f"{key_prefix}.N_CTX_VISION is {n_ctx_vision}; it must be at least 1.")
        if depth_vision < 1:
            raise UserFacingError(f"{key_prefix}.PROMPT_DEPTH_VISION is {depth_vision}; it must be at least 1.")
        self.text = FixedPrompts(classnames, DEFAULT_TEMPLATE)
        self._init_vision_prompts(backbone, n_ctx_vision, depth_vision, key_prefix, lowest_depth=1)
        logger.info("VPT prompts: vision %d tokens, depth %d; text fixed %r", n_ctx_vision, depth_vision,
                    DEFAULT_TEMPLATE)

    def forward(self, text_encoder):
        return self.text(text_encoder)


def ivlp_prompt_learner(cfg, backbone, classnames, node="IVLP"):
    """The IVLPPromptLearner that TRAINER.<node> describes (IVLP's keys; PromptSRC has the same ones)."""
    ivlp = cfg.TRAINER[node]
    return IVLPPromptLearner(
        backbone, classnames, n_ctx_text=ivlp.N_CTX_TEXT, n_ctx_vision=ivlp.N_CTX_VISION, ctx_init=ivlp.CTX_INIT,
        depth_text=ivlp.PROMPT_DEPTH_TEXT, depth_vision=ivlp.PROMPT_DEPTH_VISION, key_prefix=f"TRAINER.{node}",
    )


def vpt_prompts(cfg, backbone, classnames):
    """The VPTPrompts that TRAINER.VPT describes."""
    vpt = cfg.TRAINER.VPT
    return VPTPrompts(backbone, classnames, n_ctx_vision=vpt.N_CTX_VISION, depth_vision=vpt.PROMPT_DEPTH_VISION)
