"""The backbone interface: what the trainers, prompt learners, head, adapters, fine-tuning, TTT and
checkpoint code need from a vision-language dual encoder, so that none of them touches a library's
internals.

A `Backbone` is a plain object (not a module) that hands out the library's own modules:

- `image_encoder`: module, images (B, 3, H, W) in `image_dtype` -> unnormalised features (B, E).
- `text_encoder`: a `TextEncoder` module, prompt embeddings or token ids -> features (N, E).
- `tokenizer`: a `Tokenizer`; `text_encoder.token_embedding` is the token embedding table.
- `logit_scale` (log of the multiplier, a parameter) and `logit_bias` (a parameter, or None for
  softmax-trained models); `objective` is "softmax" (CLIP) or "sigmoid" (SigLIP).
- `embed_dim`, `text_width`, `vision_width`; `preprocess` (image size, mean/std, interpolation
  and the test-time resize mode from the model's own preprocessing config).
- `attention_sites(tower)`: where each block's self-attention is (CLIP-LoRA, trainers/model/lora.py).
- MaPLe's hooks: `text_prompt_sites()` / `vision_prompt_sites()` give the residual blocks (and, for
  the vision tower, the module whose input is the patch-embedding output) or raise a
  UserFacingError naming what the backbone lacks.
- `cast(dtype)` puts the weights in a precision the library's own way; `checkpoint_blocks(tower)`
  turns on activation checkpointing of a tower's blocks; `signature()` identifies the backbone in
  checkpoints.

Backends are registered by name prefix (`trainers.model.backbones.register_backend`), e.g.
"open_clip:" -> the open_clip backend; names without a registered prefix go to the OpenAI `clip`
backend (its model names and local checkpoint files).
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserFacingError
from ..image_resize import RESIZE_MODES

OBJECTIVES = ("softmax", "sigmoid")


class BackboneError(UserFacingError):
    """A backbone that cannot be found, fetched, read or used as asked; the message says what to do."""


@dataclass(frozen=True)
class Preprocess:
    """The vision tower's input: square `image_size` px, normalised with `mean` / `std` (RGB, 0..1 scale),
    resized with `interpolation` (a torchvision/Dassl name: "bicubic", "bilinear", "nearest"). A test
    image is brought to that size as `resize_mode` says (one of RESIZE_MODES, see image_resize.py):
    "shortest" side then a centre crop (CLIP), "squash" the whole image (SigLIP), or "longest" side
    then padding."""

    image_size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")


class Tokenizer:
    """Text -> token ids (N, context_length), and a text's own tokens without special tokens.

    `prefix_length` is the number of special tokens a tokenised sequence starts with before the
    text (1 for CLIP's start token, 0 for SigLIP's tokenizers): prompt learners put their context
    there, where the text begins.
    """

    context_length: int

    def __call__(self, texts):
        raise NotImplementedError

    def encode(self, text):
        """The token ids of `text` alone (no start, end or padding tokens)."""
        raise NotImplementedError

    @functools.cached_property
    def prefix_length(self):
        probe = "photo"
        first = self.encode(probe)[0]
        return self([probe])[0].tolist().index(first)


class TextEncoder(nn.Module):
    """The text tower. forward(prompt_embeddings (N, L, W), tokenized (N, L)) -> features (N, E): the
    tower run on token embeddings that may be learned, pooled where `tokenized` says (CLIP: the
    end-of-text token; SigLIP: the last position). encode_tokens(tokenized) is the model's own
    encode_text. `token_embedding` is the embedding table (an nn.Embedding), `tokenizer` the
    backbone's Tokenizer, `dtype` the dtype the tower computes in. A tower that cannot take embeddings sets `takes_embeddings = False`."""

    takes_embeddings = True

    @property
    def dtype(self):
        raise NotImplementedError

    def encode_tokens(self, tokenized):
        return self(self.token_embedding(tokenized), tokenized)


@dataclass
class PromptSites:
    """Where MaPLe's prompts go in one tower: its residual blocks in order, whether they take
    (N, L, W) (`batch_first`) or (L, N, W), and for the vision tower `stem`, the module whose input
    (N, L, W) is the patch-embedding output (class and patch tokens with positions) that the
    first-layer prompts are appended to. `prompt_start` is the first text position of the text
    tower's sequences (where deep text prompts go)."""

    blocks: list
    batch_first: bool
    stem: nn.Module | None = None
    prompt_start: int = 1


class Backbone:
    """A loaded dual encoder; see the module docstring. Implementations set the attributes in
    __init__ and implement the methods below."""

    family = ""  # "openai", "open_clip", "hf"

    name: str
    model: nn.Module  # the library's own model object
    image_encoder: nn.Module
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    logit_scale: nn.Parameter
    logit_bias: nn.Parameter | None = None
    embed_dim: int
    text_width: int
    vision_width: int
    preprocess: Preprocess

    @property
    def objective(self):
        """The model's own training objective: "sigmoid" when it has a logit bias (SigLIP)."""
        return "sigmoid" if self.logit_bias is not None else "softmax"

    @property
    def image_dtype(self):
        """The dtype images are given to the image encoder in."""
        return self.text_encoder.dtype

    def cast(self, dtype):
        """Put the weights in `dtype` (float16: the library's own half-precision conversion) in place."""
        raise NotImplementedError

    def vision_kind(self):
        """A short word for the image tower, e.g. "ViT", "ResNet", "timm:vit_base_patch16_siglip_224"."""
        raise NotImplementedError

    def signature(self):
        """Plain data naming this backbone and the widths trained weights depend on; saved in checkpoints."""
        return {
            "family": self.family,
            "model": self.model_id(),
            "embed_dim": self.embed_dim,
            "text_width": self.text_width,
            "vision_width": self.vision_width,
            "vision": self.vision_kind(),
            "image_size": self.preprocess.image_size,
        }

    def model_id(self):
        """The model's name within its family (None where only the file says, e.g. a local OpenAI file)."""
        return None

    def describe(self):
        bias = f", logit bias {self.logit_bias.item():.2f}" if self.logit_bias is not None else ""
        return (
            f"{self.vision_kind()} image encoder, width {self.vision_width}, text width {self.text_width}, "
            f"embedding {self.embed_dim}, {self.preprocess.image_size} px{bias}"
        )

    def text_prompt_sites(self):
        raise BackboneError(f"{self.name}: its text tower does not take deep prompts (MaPLe).")

    def vision_prompt_sites(self):
        raise BackboneError(f"{self.name}: its image tower does not take deep prompts (MaPLe).")

    def attention_sites(self, tower):
        """(module, attribute) of the self-attention of each transformer block of the "image" or "text"
        tower, first block first (CLIP-LoRA's sites); empty if the tower has no transformer blocks."""
        return []

    def checkpoint_blocks(self, tower):
        """Recompute the activations of the "image" or "text" tower's blocks in the backward pass;
        False if that tower has no transformer blocks."""
        return False


def same_backbone(saved, current):
    """Whether a checkpoint's backbone signature fits the backbone loaded now: every entry both
    record must agree, where None means "not known" (a local OpenAI file has no model name).
    Checkpoints written before backbones had families hold only widths, all of OpenAI models."""
    saved = {"family": "openai", **saved}
    return all(
        saved[key] == current[key]
        for key in saved.keys() & current.keys()
        if saved[key] is not None and current[key] is not None
    )


def describe_signature(signature):
    name = signature.get("model") or "a local file"
    return (f"{signature.get('family', 'openai')} {name}: {signature['vision']} width {signature['vision_width']}, "
            f"embedding {signature['embed_dim']}")


def pooled_at(features, positions):
    """features (N, L, W) at one position per sequence (N,) -> (N, W)."""
    return features[torch.arange(features.shape[0], device=features.device), positions]
