"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023) on the clip package's own model.

With n = N_CTX context tokens and J = PROMPT_DEPTH:

- Text. The first-layer prompt is "[SOS] c_1 .. c_n <rest of CTX_INIT> <class>. [EOS]": the
  learned context c replaces the first n tokens of CTX_INIT and its remaining words stay fixed
  (for the defaults "a photo" is learned, "of a" is not). Blocks 1 .. J-1 of the text transformer
  each get their own n learned tokens p_i at positions 1 .. n of their input, replacing what the
  previous block produced there; blocks J and later see the previous block's output unchanged.
- Vision. Coupling functions (linear maps, text width -> vision width) turn the text tokens into
  vision tokens: F_0(c) is appended after the class and patch tokens (after the positional
  embedding, before `ln_pre`; the prompts get no positional embedding), and block i in 1 .. J-1
  gets F_i(p_i) in the last n positions of its input.

The prompts are injected with forward pre-hooks on `ln_pre` and on the residual blocks of
`clip_model.transformer` / `clip_model.visual.transformer`, which exist only while a prompted
encoder call runs: CLIP's code is used as it is, and outside those calls CLIP is unchanged.

Parameter names follow MaPLe's (ctx, proj, compound_prompts_text, compound_prompt_projections), so
the prompt learners of MaPLe's released checkpoints load into this one.
"""

import contextlib
import copy
import logging

import torch
from clip import clip as clip_api
from torch import nn

from .errors import UserFacingError
from .model import CLIPClassifier
from .prompts import readable

logger = logging.getLogger(__name__)


def has_vit_image_encoder(clip_model):
    return hasattr(clip_model.visual, "transformer")


def replace_tokens(x, tokens, start):
    """x (L, N, W), a residual block's input, with positions start .. start+n-1 of every sequence
    replaced by tokens (n, W); a negative start counts from the end."""
    length, batch = x.shape[0], x.shape[1]
    start = start % length
    block = tokens.to(x.dtype).unsqueeze(1).expand(-1, batch, -1)
    return torch.cat([x[:start], block, x[start + tokens.shape[0]:]], dim=0)


@contextlib.contextmanager
def deep_prompts(blocks, prompts, start):
    """While active, block i + 1 of `blocks` receives prompts[i] (n, W) at positions start ..
    start+n-1 of its input; block 0 and the blocks after the last prompt are left alone."""
    blocks = list(blocks)
    if len(prompts) > len(blocks) - 1:
        raise ValueError(f"{len(prompts)} deep prompts for a transformer of {len(blocks)} blocks")
    handles = []
    try:
        for block, tokens in zip(blocks[1:], prompts):
            handles.append(block.register_forward_pre_hook(_token_replacer(tokens, start)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _token_replacer(tokens, start):
    def hook(module, args):
        return (replace_tokens(args[0], tokens, start), *args[1:])

    return hook


@contextlib.contextmanager
def appended_tokens(module, tokens):
    """While active, `module`'s input (N, L, W) gets tokens (n, W) appended to every sequence."""

    def hook(module, args):
        x = args[0]
        block = tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x, block], dim=1), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class MaPLePromptLearner(nn.Module):
    """MaPLe's prompts for both encoders; see the module docstring for the layout.

    forward(text_encoder) returns the K class text features; encode_image(image_encoder, images)
    the prompted image features. All parameters are float32 (cast where they meet CLIP's
    activations); class-name buffers are not persistent, so checkpoints hold only what is learned.
    """

    def __init__(self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a", depth=9):
        super().__init__()
        if not has_vit_image_encoder(clip_model):
            raise UserFacingError(
                "MaPLe needs a ViT image encoder: it puts prompts into the layers of the vision "
                "transformer, and this CLIP has a ResNet image encoder. Set MODEL.BACKBONE.NAME to a ViT "
                "backbone (ViT-B/16, ViT-B/32, ViT-L/14)."
            )
        layers = min(len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks))
        if not 1 <= depth <= layers:
            raise UserFacingError(
                f"TRAINER.MAPLE.PROMPT_DEPTH is {depth}; it must be between 1 (prompts in the input only) "
                f"and {layers}, the number of layers of this CLIP's encoders."
            )
        if n_ctx < 1:
            raise UserFacingError(f"TRAINER.MAPLE.N_CTX is {n_ctx}; it must be at least 1.")
        token_embedding = clip_model.token_embedding
        text_width = token_embedding.weight.shape[1]
        vision_width = clip_model.visual.conv1.weight.shape[0]

        ctx_init = ctx_init.replace("_", " ").strip()
        if ctx_init:
            init_ids = clip_api.tokenize(ctx_init)
            init_tokens = int(init_ids[0].argmax()) - 1  # between SOS and EOS (the highest id)
            if n_ctx > init_tokens:
                raise UserFacingError(
                    f"TRAINER.MAPLE.N_CTX is {n_ctx} but CTX_INIT {ctx_init!r} has only {init_tokens} tokens; "
                    "the context is initialised from its first N_CTX tokens. Lengthen CTX_INIT, lower N_CTX, "
                    'or set CTX_INIT "" for a random context.'
                )
            with torch.no_grad():
                ctx = token_embedding(init_ids)[0, 1 : 1 + n_ctx].float().clone()
            prefix_text = ctx_init
        else:
            ctx = torch.empty(n_ctx, text_width).normal_(std=0.02)
            prefix_text = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)
        # Coupling function of the first layer: text context -> vision prompts.
        self.proj = nn.Linear(text_width, vision_width)
        # Deeper layers: one text prompt each, coupled to the vision side by its own linear map.
        # MaPLe starts all of these maps from copies of one initialisation.
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_width).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        coupling = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])
        self.n_ctx = n_ctx
        self.depth = depth

        tokenized = clip_api.tokenize([f"{prefix_text} {name}." for name in readable(classnames)])
        with torch.no_grad():
            embedded = token_embedding(tokenized)
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :], persistent=False)  # rest, class, '.', EOS
        logger.info(
            "MaPLe prompts: %d context tokens initialised as %r (learned: the first %d), depth %d, "
            "text width %d -> vision width %d", n_ctx, prefix_text, n_ctx, depth, text_width, vision_width,
        )

    def prompt_embeddings(self):
        """The text transformer's input tokens (K, L, W) before the positional embedding."""
        prefix = self.token_prefix
        ctx = self.ctx.to(prefix.dtype).unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, ctx, self.token_suffix], dim=1)

    def vision_prompts(self):
        """(first-layer vision prompts (n, Wv), [vision prompts of blocks 1 .. depth-1])."""
        deeper = [couple(text) for couple, text in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return self.proj(self.ctx), deeper

    def forward(self, text_encoder):
        with deep_prompts(text_encoder.transformer.resblocks, list(self.compound_prompts_text), start=1):
            return text_encoder(self.prompt_embeddings(), self.tokenized_prompts)

    def encode_image(self, image_encoder, images):
        first, deeper = self.vision_prompts()
        with appended_tokens(image_encoder.ln_pre, first), deep_prompts(
            image_encoder.transformer.resblocks, deeper, start=-self.n_ctx
        ):
            return image_encoder(images)


class MaPLeClassifier(CLIPClassifier):
    """CLIPClassifier whose prompts (a MaPLePromptLearner) reach into both encoders."""

    def __init__(self, clip_model, prompts, head=None, adapter=None):
        if not isinstance(prompts, MaPLePromptLearner):
            raise TypeError(f"MaPLeClassifier needs a MaPLePromptLearner, got {type(prompts).__name__}")
        super().__init__(clip_model, prompts, head=head, adapter=adapter)

    def encode_image(self, images):
        return self.prompts.encode_image(self.image_encoder, images.to(self.dtype))


def maple_prompt_learner(cfg, clip_model, classnames):
    """The MaPLePromptLearner that TRAINER.MAPLE describes."""
    maple = cfg.TRAINER.MAPLE
    return MaPLePromptLearner(
        clip_model, classnames, n_ctx=maple.N_CTX, ctx_init=maple.CTX_INIT, depth=maple.PROMPT_DEPTH
    )
