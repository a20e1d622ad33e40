"""Class prompts: fixed hand-crafted ones and CoOp's learnable context.

A prompt source is the module that gives a CLIPClassifier its class text features. The contract:

- By default `forward(text_encoder)` returns the text features of the K classes (K, E), shared by
  every image.
- A conditional source sets the class attribute `conditional = True`; its
  `forward(text_encoder, image_features)` takes the image encoder's output (B, E) (unnormalised,
  before any feature adapter) and returns each image's own class features (B, K, E) (CoCoOp).
  The classifier never caches them.
- A source that prompts the image encoder too (MaPLe, and deep vision prompts in general) has
  `encode_image(image_encoder, images)` -> (B, E); the classifier encodes images through it.

`is_conditional` and `prompts_images` answer these questions for any module. Buffers that depend
on the class names are not persistent: checkpoints hold only what is learned, so weights trained
on base classes load for new classes.
"""

import logging

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserFacingError
from .backbones import as_backbone
from .module_state import is_trained, weights_key

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

# Named template ensembles. "openai_imagenet": the 80 ImageNet prompts of CLIP's zero-shot
# evaluation, which FLYP and WiSE-FT use to train and evaluate on ImageNet (listed sorted).
TEMPLATE_SETS = {
    "openai_imagenet": (
        'a bad photo of a {}.',
        'a bad photo of the {}.',
        'a black and white photo of a {}.',
        'a black and white photo of the {}.',
        'a blurry photo of a {}.',
        'a blurry photo of the {}.',
        'a bright photo of a {}.',
        'a bright photo of the {}.',
        'a cartoon {}.',
        'a close-up photo of a {}.',
        'a close-up photo of the {}.',
        'a cropped photo of a {}.',
        'a cropped photo of the {}.',
        'a dark photo of a {}.',
        'a dark photo of the {}.',
        'a doodle of a {}.',
        'a doodle of the {}.',
        'a drawing of a {}.',
        'a drawing of the {}.',
        'a embroidered {}.',
        'a good photo of a {}.',
        'a good photo of the {}.',
        'a jpeg corrupted photo of a {}.',
        'a jpeg corrupted photo of the {}.',
        'a low resolution photo of a {}.',
        'a low resolution photo of the {}.',
        'a origami {}.',
        'a painting of a {}.',
        'a painting of the {}.',
        'a photo of a clean {}.',
        'a photo of a cool {}.',
        'a photo of a dirty {}.',
        'a photo of a hard to see {}.',
        'a photo of a large {}.',
        'a photo of a nice {}.',
        'a photo of a small {}.',
        'a photo of a weird {}.',
        'a photo of a {}.',
        'a photo of many {}.',
        'a photo of my {}.',
        'a photo of one {}.',
        'a photo of the clean {}.',
        'a photo of the cool {}.',
        'a photo of the dirty {}.',
        'a photo of the hard to see {}.',
        'a photo of the large {}.',
        'a photo of the nice {}.',
        'a photo of the small {}.',
        'a photo of the weird {}.',
        'a photo of the {}.',
        'a pixelated photo of a {}.',
        'a pixelated photo of the {}.',
        'a plastic {}.',
        'a plushie {}.',
        'a rendering of a {}.',
        'a rendering of the {}.',
        'a rendition of a {}.',
        'a rendition of the {}.',
        'a sculpture of a {}.',
        'a sculpture of the {}.',
        'a sketch of a {}.',
        'a sketch of the {}.',
        'a tattoo of a {}.',
        'a tattoo of the {}.',
        'a toy {}.',
        'a {} in a video game.',
        'art of a {}.',
        'art of the {}.',
        'graffiti of a {}.',
        'graffiti of the {}.',
        'itap of a {}.',
        'itap of my {}.',
        'itap of the {}.',
        'the cartoon {}.',
        'the embroidered {}.',
        'the origami {}.',
        'the plastic {}.',
        'the plushie {}.',
        'the toy {}.',
        'the {} in a video game.',
    ),
    # PromptSRC's teacher: 60 of those prompts, in the order of muzairkhattak/PromptSRC@bb95c77
    # trainers/imagenet_templates.py (the order of the sum that averages them).
    "promptsrc_imagenet": (
        'a photo of a {}.',
        'a bad photo of a {}.',
        'a photo of many {}.',
        'a sculpture of a {}.',
        'a photo of the hard to see {}.',
        'a low resolution photo of the {}.',
        'a rendering of a {}.',
        'graffiti of a {}.',
        'a bad photo of the {}.',
        'a cropped photo of the {}.',
        'a tattoo of a {}.',
        'the embroidered {}.',
        'a photo of a hard to see {}.',
        'a bright photo of a {}.',
        'a photo of a clean {}.',
        'a photo of a dirty {}.',
        'a dark photo of the {}.',
        'a drawing of a {}.',
        'a photo of my {}.',
        'the plastic {}.',
        'a photo of the cool {}.',
        'a close-up photo of a {}.',
        'a black and white photo of the {}.',
        'a painting of the {}.',
        'a painting of a {}.',
        'a pixelated photo of the {}.',
        'a sculpture of the {}.',
        'a bright photo of the {}.',
        'a cropped photo of a {}.',
        'a plastic {}.',
        'a photo of the dirty {}.',
        'a jpeg corrupted photo of a {}.',
        'a blurry photo of the {}.',
        'a photo of the {}.',
        'a good photo of the {}.',
        'a rendering of the {}.',
        'a {} in a video game.',
        'a photo of one {}.',
        'a doodle of a {}.',
        'a close-up photo of the {}.',
        'the origami {}.',
        'the {} in a video game.',
        'a sketch of a {}.',
        'a doodle of the {}.',
        'a origami {}.',
        'a low resolution photo of a {}.',
        'the toy {}.',
        'a rendition of the {}.',
        'a photo of the clean {}.',
        'a photo of a large {}.',
        'a rendition of a {}.',
        'a photo of a nice {}.',
        'a photo of a weird {}.',
        'a blurry photo of a {}.',
        'a cartoon {}.',
        'art of a {}.',
        'a sketch of the {}.',
        'a embroidered {}.',
        'a pixelated photo of a {}.',
        'itap of the {}.',
    ),
}


def is_conditional(prompts):
    """Whether the prompt source gives per-image class features (forward(text_encoder, image_features))."""
    return bool(getattr(prompts, "conditional", False))


def prompts_images(prompts):
    """Whether the prompt source encodes the images itself (encode_image(image_encoder, images))."""
    return callable(getattr(prompts, "encode_image", None))


def zero_shot_template(dataset_name):
    return ZERO_SHOT_TEMPLATES.get(dataset_name, DEFAULT_TEMPLATE)


def resolve_templates(value, dataset_name):
    """Templates from a config value: the name of a set in TEMPLATE_SETS, one template with '{}',
    or "" for CoOp's zero-shot template of the dataset."""
    if not value:
        return [zero_shot_template(dataset_name)]
    if value in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[value])
    if "{}" not in value:
        raise ValueError(
            f"{value!r} is neither a template with '{{}}' where the class name goes nor a template set "
            f"({', '.join(TEMPLATE_SETS)})"
        )
    return [value]


def readable(classnames):
    """Class names as words: folder names use underscores for spaces."""
    return [name.replace("_", " ") for name in classnames]


def fill_template(template, classnames):
    if "{}" not in template:
        raise ValueError(f"Prompt template {template!r} has no '{{}}' where the class name goes")
    return [template.format(name) for name in readable(classnames)]


class FixedPrompts(nn.Module):
    """Hand-crafted prompts: one template, or an ensemble whose class features are the mean of the
    L2-normalised features of each template (CLIP's zero-shot prompt ensembling).

    While the text encoder is frozen, the features are computed without gradients and reused
    until its weights change. While it trains (and gradients are on) they are recomputed, with
    gradients, at every call; an ensemble then encodes one template per class drawn at random,
    since encoding all T templates of all K classes at every step would cost T times as much.
    The prompts are tokenised by the text encoder's own tokenizer when first encoded.
    """

    def __init__(self, classnames, template):
        super().__init__()
        self.templates = [template] if isinstance(template, str) else list(template)
        if not self.templates:
            raise ValueError("FixedPrompts needs at least one template")
        self.num_classes = len(classnames)
        prompts = [prompt for each in self.templates for prompt in fill_template(each, classnames)]
        logger.info("Prompts (%d classes x %d template%s), e.g. %r", self.num_classes, len(self.templates),
                    "s" if len(self.templates) > 1 else "", prompts[0])
        # Row t * K + k holds template t filled with class k.
        self.texts = prompts
        self._tokenized = None
        self._cache = None

    @property
    def is_ensemble(self):
        return len(self.templates) > 1

    def tokenized_prompts(self, text_encoder):
        """The prompts' token ids (T * K, L) by the encoder's tokenizer, on the encoder's device."""
        device = text_encoder.token_embedding.weight.device
        if self._tokenized is None or self._tokenized[0] is not text_encoder.tokenizer:
            self._tokenized = (text_encoder.tokenizer, text_encoder.tokenizer(self.texts))
        if self._tokenized[1].device != device:
            self._tokenized = (self._tokenized[0], self._tokenized[1].to(device))
        return self._tokenized[1]

    def forward(self, text_encoder):
        if torch.is_grad_enabled() and is_trained(text_encoder):
            labels = torch.arange(self.num_classes, device=text_encoder.token_embedding.weight.device)
            return self._encode(text_encoder, self._prompt_rows(labels))
        key = (text_encoder.token_embedding.weight.device, weights_key(text_encoder))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._all_templates(text_encoder))
        return self._cache[1]

    def caption_features(self, text_encoder, labels):
        """Features (B, E) of one prompt per label, a template drawn at random for each (FLYP's
        captions); a prompt that occurs several times is encoded once."""
        rows, inverse = torch.unique(self._prompt_rows(labels), return_inverse=True)
        return self._encode(text_encoder, rows)[inverse]

    def _prompt_rows(self, labels):
        if not self.is_ensemble:
            return labels
        drawn = torch.randint(len(self.templates), labels.shape, device=labels.device)
        return drawn * self.num_classes + labels

    def _encode(self, text_encoder, rows):
        features = text_encoder.encode_tokens(self.tokenized_prompts(text_encoder)[rows])
        return F.normalize(features, dim=-1) if self.is_ensemble else features

    def _all_templates(self, text_encoder):
        tokenized = self.tokenized_prompts(text_encoder)
        if not self.is_ensemble:
            return text_encoder.encode_tokens(tokenized)
        total = 0.0
        for rows in tokenized.split(self.num_classes):  # a template at a time bounds memory
            total = total + F.normalize(text_encoder.encode_tokens(rows).float(), dim=-1)
        return (total / len(self.templates)).to(text_encoder.dtype)


def context_words(ctx_init):
    """CTX_INIT as words: folder-style underscores become spaces."""
    return ctx_init.replace("_", " ").strip()


def check_init_words(backbone, ctx_init, n_ctx, n_ctx_key):
    """Refuse a context of more tokens than the words CTX_INIT that initialise its first tokens
    (MaPLe's and IVLP's rule); `n_ctx_key` is the config key of the context length."""
    init_tokens = len(backbone.tokenizer.encode(ctx_init)) if ctx_init else n_ctx
    if n_ctx > init_tokens:
        short = n_ctx_key.rpartition(".")[2]
        raise UserFacingError(
            f"{n_ctx_key} is {n_ctx} but CTX_INIT {ctx_init!r} has only {init_tokens} tokens; the context is "
            f"initialised from its first {short} tokens. Lengthen CTX_INIT, lower {short}, "
            'or set CTX_INIT "" for a random context.'
        )


def initial_context(backbone, ctx_init, n_ctx, shape):
    """(context float32, prompt prefix text) of CoOp and MaPLe: the token embeddings of the first
    n_ctx tokens of the words ctx_init, or, without words, a random context of `shape` (N(0, 0.02))
    written "X X .. X" in the prompts."""
    if ctx_init:
        tokenizer = backbone.tokenizer
        start = tokenizer.prefix_length
        with torch.no_grad():
            embedded = backbone.text_encoder.token_embedding(tokenizer(ctx_init)).float()
        return embedded[0, start : start + n_ctx].clone(), ctx_init
    return torch.empty(shape).normal_(std=0.02), " ".join(["X"] * n_ctx)


class LearnedContext(nn.Module):
    """What CoOp's and MaPLe's prompt learners share: a learned context `ctx` ((n, W), or (K, n, W)
    per class) standing where the tokenizer puts the text of "<prefix text> <class>.", between the
    frozen embeddings of what comes before (`token_prefix`: the start token, if the tokenizer has
    one) and after (`token_suffix`: the rest, the class name, '.', the end token, padding).

    The context is a float32 parameter even when CLIP runs in fp16; it is cast where it joins the
    frozen token embeddings. The class-name buffers are not persistent: checkpoints hold only what
    is learned, so weights trained on base classes load for new classes.
    """

    def __init__(self, backbone, classnames, ctx, prefix_text):
        super().__init__()
        tokenizer = backbone.tokenizer
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = ctx.shape[-2]
        names = readable(classnames)
        self.name_lens = [len(tokenizer.encode(name)) for name in names]
        tokenized = tokenizer([f"{prefix_text} {name}." for name in names])
        with torch.no_grad():
            embedded = backbone.text_encoder.token_embedding(tokenized)
        start = tokenizer.prefix_length
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :start], persistent=False)
        self.register_buffer("token_suffix", embedded[:, start + self.n_ctx :], persistent=False)

    def prompt_embeddings(self, ctx=None):
        """The text tower's input tokens (K, L, W) before the positional embedding: the context
        between prefix and suffix. ctx: the context to place there instead of the learned one,
        (n, W) for all classes or (K, n, W) one per class, e.g. a context computed from an image
        (CoCoOp: one call per image); None, the learned `ctx`."""
        return torch.cat([self.token_prefix, self.class_contexts(ctx), self.token_suffix], dim=1)

    def class_contexts(self, ctx=None):
        """ctx (or the learned context if None) as (K, n, W) in the token embeddings' dtype."""
        prefix = self.token_prefix
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() not in (2, 3) or ctx.shape[-2:] != self.ctx.shape[-2:] or (
            ctx.dim() == 3 and ctx.shape[0] != prefix.shape[0]
        ):
            raise ValueError(
                f"A context for these prompts is ({self.n_ctx}, {self.ctx.shape[-1]}) or ({prefix.shape[0]}, "
                f"{self.n_ctx}, {self.ctx.shape[-1]}) (one per class), got {tuple(ctx.shape)}"
            )
        ctx = ctx.to(prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return ctx


class CoOpPromptLearner(LearnedContext):
    """CoOp's learnable context: [SOS] ctx_1 .. ctx_M [CLASS]. [EOS] (class token at the end,
    middle or front), one context shared by all classes or one per class (CSC). On a tokenizer
    without start token (SigLIP's) the context opens the sequence.
    """

    POSITIONS = ("end", "middle", "front")

    def __init__(self, backbone, classnames, n_ctx=16, ctx_init="", class_specific=False, position="end"):
        if position not in self.POSITIONS:
            raise ValueError(f"CLASS_TOKEN_POSITION must be one of {', '.join(self.POSITIONS)}, got {position!r}")
        backbone = as_backbone(backbone)
        width = backbone.text_encoder.token_embedding.weight.shape[1]
        ctx_init = context_words(ctx_init)
        if ctx_init:
            n_ctx = len(ctx_init.split(" "))  # the words' number sets the context length
        shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
        ctx, prefix_text = initial_context(backbone, ctx_init, n_ctx, shape)
        logger.info("CoOp context: %d tokens, initialised as %r%s", n_ctx, prefix_text,
                    ", class-specific" if class_specific and not ctx_init else "")
        super().__init__(backbone, classnames, ctx, prefix_text)
        self.position = position

    def prompt_embeddings(self, ctx=None):
        """As LearnedContext.prompt_embeddings, with the class name where `position` puts it."""
        if self.position == "end":
            return super().prompt_embeddings(ctx)
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = self.class_contexts(ctx)
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


def coop_prompt_learner(cfg, backbone, classnames):
    """The CoOpPromptLearner that TRAINER.COOP describes."""
    coop = cfg.TRAINER.COOP
    return CoOpPromptLearner(
        backbone, classnames, n_ctx=coop.N_CTX, ctx_init=coop.CTX_INIT,
        class_specific=coop.CSC, position=coop.CLASS_TOKEN_POSITION,
    )
