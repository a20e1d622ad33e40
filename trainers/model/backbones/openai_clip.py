"""The OpenAI `clip` package's models as a Backbone (today's behaviour: the model is the clip
package's own CLIP, built from OpenAI's checkpoints by trainers.model.backbones.openai_loader)."""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Backbone, BackboneError, Preprocess, PromptSites, TextEncoder, Tokenizer, pooled_at
from .openai_loader import load_clip
from .openai_package import SimpleTokenizer, clip_api, clip_model

# OpenAI CLIP's preprocessing (clip.load's transform): bicubic resize, these mean and std.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipTokenizer(Tokenizer):
    """clip.tokenize: [SOS] text [EOS] 0 ..., 77 tokens; the end-of-text token has the highest id."""

    context_length = 77

    def __init__(self):
        self._bpe = SimpleTokenizer()

    def __call__(self, texts):
        return clip_api.tokenize(texts)

    def encode(self, text):
        return self._bpe.encode(text)

    prefix_length = 1


@functools.cache
def clip_tokenizer():
    return ClipTokenizer()


class ClipTextEncoder(TextEncoder):
    """Maps prompt embeddings (N, L, W) to text features (N, E).

    The features are read at each prompt's end-of-text token, the highest token id in the
    tokenised prompt, exactly as `CLIP.encode_text` does for token ids.
    """

    def __init__(self, model):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.transformer = model.transformer
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.tokenizer = clip_tokenizer()

    @property
    def dtype(self):
        return self.text_projection.dtype

    def forward(self, prompt_embeddings, tokenized_prompts):
        x = prompt_embeddings.to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # the blocks take (L, N, W)
        x = self.ln_final(x).to(self.dtype)
        return pooled_at(x, tokenized_prompts.argmax(dim=-1)) @ self.text_projection


class ClipBackbone(Backbone):
    """A clip.model.CLIP (ViT or ResNet image encoder)."""

    family = "openai"

    def __init__(self, model, name=""):
        self.name = name or "OpenAI CLIP"
        self.model = model
        self.image_encoder = model.visual
        self.text_encoder = ClipTextEncoder(model)
        self.tokenizer = self.text_encoder.tokenizer
        self.logit_scale = model.logit_scale
        self.logit_bias = None
        self.embed_dim = int(model.text_projection.shape[1])
        self.text_width = int(model.ln_final.weight.shape[0])
        visual = model.visual
        self.is_vit = hasattr(visual, "transformer")
        self.vision_width = int(visual.transformer.width if self.is_vit else visual.layer1[0].conv1.weight.shape[0])
        self.preprocess = Preprocess(int(visual.input_resolution), OPENAI_MEAN, OPENAI_STD, "bicubic")

    def model_id(self):
        return self.name if self.name in clip_api.available_models() else None

    def vision_kind(self):
        return "ViT" if self.is_vit else "ResNet"

    def signature(self):
        signature = super().signature()
        signature["patch_size"] = int(self.model.visual.conv1.kernel_size[0]) if self.is_vit else None
        return signature

    def cast(self, dtype):
        if dtype == torch.float16:
            clip_model.convert_weights(self.model)
        else:
            self.model.float()

    def text_prompt_sites(self):
        return PromptSites(list(self.model.transformer.resblocks), batch_first=False, prompt_start=1)

    def vision_prompt_sites(self):
        if not self.is_vit:
            raise BackboneError(
                "MaPLe needs a ViT image encoder: it puts prompts into the layers of the vision "
                "transformer, and this CLIP has a ResNet image encoder. Set MODEL.BACKBONE.NAME to a ViT "
                "backbone (ViT-B/16, ViT-B/32, ViT-L/14)."
            )
        visual = self.model.visual
        return PromptSites(list(visual.transformer.resblocks), batch_first=False, stem=visual.ln_pre)

    def attention_sites(self, tower):
        if tower == "image" and not self.is_vit:
            return []
        transformer = self.model.transformer if tower == "text" else self.model.visual.transformer
        return [(block, "attn") for block in transformer.resblocks]

    def checkpoint_blocks(self, tower):
        if tower == "text":
            checkpoint_blocks(self.text_encoder.transformer)
            return True
        if not self.is_vit:
            return False
        checkpoint_blocks(self.image_encoder.transformer)
        return True


class CheckpointedBlocks(nn.Sequential):
    """The residual blocks of a CLIP transformer, each run under activation checkpointing while
    gradients are on: its activations are recomputed in the backward pass instead of stored.

    Built from the same block modules under the same indices, so the state-dict keys (and hence
    checkpoints) are those of the plain `nn.Sequential` it replaces.
    """

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        for block in self:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def checkpoint_blocks(transformer):
    """Make a clip `Transformer` (text tower or ViT image tower) checkpoint its residual blocks
    (ClipBackbone.checkpoint_blocks)."""
    if not isinstance(transformer.resblocks, CheckpointedBlocks):
        transformer.resblocks = CheckpointedBlocks(*transformer.resblocks)
    return transformer


def is_clip_model(model):
    return isinstance(model, nn.Module) and all(
        hasattr(model, name) for name in ("visual", "transformer", "token_embedding", "text_projection", "ln_final")
    )


def load(spec, weights="", cache_dir=None, download=True):
    """An OpenAI model name of clip.available_models() or a local checkpoint file; `weights`, when
    given, is the file to read instead."""

    return ClipBackbone(load_clip(weights or spec, cache_dir=cache_dir, download=download), name=spec)
