"""Class prompts: fixed hand-crafted ones and CoOp's learnable context.

A prompt source is a module whose `forward(text_encoder)` returns the text features of the
K classes (K, E). Buffers that depend on the class names are not persistent: checkpoints
hold only what is learned, so weights trained on base classes load for new classes.
"""

import logging

import torch
from clip import clip as clip_api
from clip.simple_tokenizer import SimpleTokenizer
from torch import nn

logger = logging.getLogger(__name__)

# CoOp's hand-crafted zero-shot prompt per dataset (keyed by DATASET.NAME).
ZERO_SHOT_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."

_tokenizer = SimpleTokenizer()


def zero_shot_template(dataset_name):
    return ZERO_SHOT_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)


def readable(classnames):
    """Class names as words: folder names use underscores for spaces."""
    return [name.replace("_", " ") for name in classnames]


def fill_template(template, classnames):
    if "{}" not in template:
        raise ValueError(f"Prompt template {template!r} has no '{{}}' where the class name goes")
    return [template.format(name) for name in readable(classnames)]


class FixedPrompts(nn.Module):
    """Hand-crafted prompts; their features are computed once per device and reused."""

    def __init__(self, classnames, template):
        super().__init__()
        self.prompts = fill_template(template, classnames)
        logger.info("Prompts (%d), e.g. %r", len(self.prompts), self.prompts[0])
        self.register_buffer("tokenized_prompts", clip_api.tokenize(self.prompts), persistent=False)
        self._features = None

    def forward(self, text_encoder):
        cached = self._features
        if cached is None or cached.device != self.tokenized_prompts.device:
            with torch.no_grad():
                cached = text_encoder.encode_tokens(self.tokenized_prompts)
            self._features = cached
        return cached


class CoOpPromptLearner(nn.Module):
    """CoOp's learnable context: [SOS] ctx_1 .. ctx_M [CLASS]. [EOS] (class token at the end,
    middle or front), one context shared by all classes or one per class (CSC).

    The context is a float32 parameter even when CLIP runs in fp16; it is cast where it
    joins the frozen token embeddings.
    """

    POSITIONS = ("end", "middle", "front")

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", class_specific=False, position="end"):
        super().__init__()
        if position not in self.POSITIONS:
            raise ValueError(f"CLASS_TOKEN_POSITION must be one of {', '.join(self.POSITIONS)}, got {position!r}")
        token_embedding = clip_model.token_embedding
        width = token_embedding.weight.shape[1]
        num_classes = len(classnames)
        ctx_init = ctx_init.replace("_", " ").strip()
        if ctx_init:
            # Initialise from the words' embeddings; their number sets the context length.
            words = ctx_init.split(" ")
            n_ctx = len(words)
            with torch.no_grad():
                embedded = token_embedding(clip_api.tokenize(ctx_init)).float()
            ctx = embedded[0, 1 : 1 + n_ctx].clone()
            prefix_text = ctx_init
        else:
            shape = (num_classes, n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape).normal_(std=0.02)
            prefix_text = " ".join(["X"] * n_ctx)
        logger.info("CoOp context: %d tokens, initialised as %r%s", n_ctx, prefix_text,
                    ", class-specific" if class_specific and not ctx_init else "")
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        self.position = position
        names = readable(classnames)
        self.name_lens = [len(_tokenizer.encode(name)) for name in names]
        tokenized = clip_api.tokenize([f"{prefix_text} {name}." for name in names])
        with torch.no_grad():
            embedded = token_embedding(tokenized)
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :], persistent=False)  # class, '.', EOS

    def prompt_embeddings(self):
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = self.ctx.to(prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        prompts = []
        for i, name_len in enumerate(self.name_lens):
            name, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
            ctx_i = ctx[i : i + 1]
            if self.position == "middle":
                parts = [prefix[i : i + 1], ctx_i[:, :half], name, ctx_i[:, half:], rest]
            else:
                parts = [prefix[i : i + 1], name, ctx_i, rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0)

    def forward(self, text_encoder):
        return text_encoder(self.prompt_embeddings(), self.tokenized_prompts)
