"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023) on the backbone's own towers.

With n = N_CTX context tokens and J = PROMPT_DEPTH:

- Text. The first-layer prompt is "[SOS] c_1 .. c_n <rest of CTX_INIT> <class>. [EOS]": the
  learned context c replaces the first n tokens of CTX_INIT and its remaining words stay fixed
  (for the defaults "a photo" is learned, "of a" is not). Blocks 1 .. J-1 of the text transformer
  each get their own n learned tokens p_i at positions 1 .. n of their input (0 .. n-1 for a
  tokenizer without start token), replacing what the previous block produced there; blocks J and
  later see the previous block's output unchanged.
- Vision. Coupling functions (linear maps, text width -> vision width) turn the text tokens into
  vision tokens: F_0(c) is appended after the class and patch tokens (after the positional
  embedding, before `ln_pre`; the prompts get no positional embedding), and block i in 1 .. J-1
  gets F_i(p_i) in the last n positions of its input. F_0 runs in CLIP's precision (fp16 under PREC
  fp16, as MaPLe's half-precision `proj`); the deeper maps in float32, as MaPLe's.

The prompts are injected with forward pre-hooks on the stem (`ln_pre`) and on the residual blocks
that the backbone names (`Backbone.text_prompt_sites` / `vision_prompt_sites`), which exist only
while a prompted encoder call runs (trainers/model/deep_prompts.py): the library's code is used as
it is, and outside those calls the model is unchanged.

Parameter names follow MaPLe's (ctx, proj, compound_prompts_text, compound_prompt_projections), so
the prompt learners of MaPLe's released checkpoints load into this one.
"""

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserFacingError
from .backbones import as_backbone
from .classifier import CLIPClassifier
from .deep_prompts import appended_tokens, deep_prompts
from .prompts import LearnedContext, check_init_words, context_words, initial_context

logger = logging.getLogger(__name__)


class MaPLePromptLearner(LearnedContext):
    """MaPLe's prompts for both encoders; see the module docstring for the layout.

    forward(text_encoder) returns the K class text features; encode_image(image_encoder, images)
    the prompted image features. All parameters are float32 (cast where they meet CLIP's
    activations); class-name buffers are not persistent, so checkpoints hold only what is learned.
    """

    def __init__(self, backbone, classnames, n_ctx=2, ctx_init="a photo of a", depth=9):
        backbone = as_backbone(backbone)
        vision_sites = backbone.vision_prompt_sites()
        text_sites = backbone.text_prompt_sites()
        layers = min(len(text_sites.blocks), len(vision_sites.blocks))
        if not 1 <= depth <= layers:
            raise UserFacingError(
                f"TRAINER.MAPLE.PROMPT_DEPTH is {depth}; it must be between 1 (prompts in the input only) "
                f"and {layers}, the number of layers of this CLIP's encoders."
            )
        if n_ctx < 1:
            raise UserFacingError(f"TRAINER.MAPLE.N_CTX is {n_ctx}; it must be at least 1.")
        text_width, vision_width = backbone.text_width, backbone.vision_width
        ctx_init = context_words(ctx_init)
        check_init_words(backbone, ctx_init, n_ctx, "TRAINER.MAPLE.N_CTX")
        ctx, prefix_text = initial_context(backbone, ctx_init, n_ctx, (n_ctx, text_width))
        super().__init__(backbone, classnames, ctx, prefix_text)
        # Coupling function of the first layer: text context -> vision prompts.
        self.proj = nn.Linear(text_width, vision_width)
        # Deeper layers: one text prompt each, coupled to the vision side by its own linear map.
        # MaPLe starts all of these maps from copies of one initialisation.
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_width).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        coupling = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])
        self.depth = depth
        self.text_sites, self.vision_sites = text_sites, vision_sites
        logger.info(
            "MaPLe prompts: %d context tokens initialised as %r (learned: the first %d), depth %d, "
            "text width %d -> vision width %d", n_ctx, prefix_text, n_ctx, depth, text_width, vision_width,
        )

    def vision_prompts(self, dtype=torch.float32):
        """(first-layer vision prompts (n, Wv) computed in `dtype`, [vision prompts of blocks 1 .. depth-1])."""
        pairs = zip(self.compound_prompt_projections, self.compound_prompts_text, strict=True)
        deeper = [couple(text) for couple, text in pairs]
        first = F.linear(self.ctx.to(dtype), self.proj.weight.to(dtype), self.proj.bias.to(dtype))
        return first, deeper

    def forward(self, text_encoder):
        sites = self.text_sites
        with deep_prompts(sites.blocks, list(self.compound_prompts_text), sites.prompt_start, sites.batch_first):
            return text_encoder(self.prompt_embeddings(), self.tokenized_prompts)

    def encode_image(self, image_encoder, images):
        """Prompted image features; the first-layer prompts are computed in the images' dtype."""
        first, deeper = self.vision_prompts(images.dtype)
        sites = self.vision_sites
        with appended_tokens(sites.stem, first), deep_prompts(
            sites.blocks, deeper, start=-self.n_ctx, batch_first=sites.batch_first
        ):
            return image_encoder(images)


class MaPLeClassifier(CLIPClassifier):
    """A CLIPClassifier that insists on a MaPLePromptLearner. Nothing else differs: a CLIPClassifier
    encodes images through any prompt source that has encode_image, MaPLe's included."""

    def __init__(self, backbone, prompts, head=None, adapter=None):
        if not isinstance(prompts, MaPLePromptLearner):
            raise TypeError(f"MaPLeClassifier needs a MaPLePromptLearner, got {type(prompts).__name__}")
        super().__init__(backbone, prompts, head=head, adapter=adapter)


def maple_prompt_learner(cfg, backbone, classnames):
    """The MaPLePromptLearner that TRAINER.MAPLE describes."""
    maple = cfg.TRAINER.MAPLE
    return MaPLePromptLearner(
        backbone, classnames, n_ctx=maple.N_CTX, ctx_init=maple.CTX_INIT, depth=maple.PROMPT_DEPTH
    )
