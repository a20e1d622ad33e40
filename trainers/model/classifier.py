"""A dual encoder as a classifier: image encoder, a prompt source for the class texts, optionally a
feature adapter and the RAda head. Every trainer composes one of these."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import as_backbone
from .module_state import weights_key
from .prompts import is_conditional, prompts_images
from .rada_head import clip_logits


@dataclass(frozen=True, eq=False)
class ClassifierOutput:
    """What a CLIPClassifier returns: logits (B, K); the head's mask (B, K, D), None without a head;
    and the L2-normalised features the logits were computed from, for losses on features:
    image_features (B, E) and text_features, (K, E) shared by the batch or (B, K, E) per image.

    It unpacks as `logits, mask = model(images)`: iterating yields these two only.
    """

    logits: torch.Tensor
    mask: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.logits, self.mask))


class CLIPClassifier(nn.Module):
    """Returns a ClassifierOutput.

    backbone: a Backbone (or a bare clip CLIP model). prompts: a prompt source (see
    trainers.model.prompts): forward(text_encoder) -> (K, E) text features, or, if conditional,
    forward(text_encoder, image_features) -> (B, K, E); one that has encode_image(image_encoder,
    images) encodes the images too (deep vision prompts). adapter: optional module with
    forward(image_features, text_features) -> both, applied before normalisation. head: optional
    RAdaHead; without it the logits are CLIP's, s * f @ t^T (per image for per-image text
    features), computed as CoOp computes them. A backbone with a logit bias (SigLIP) adds it to the
    logits, with or without the head.
    """

    def __init__(self, backbone, prompts, head=None, adapter=None):
        super().__init__()
        backbone = as_backbone(backbone)
        self.backbone = backbone
        self.image_encoder = backbone.image_encoder
        self.text_encoder = backbone.text_encoder
        self.logit_scale = backbone.logit_scale
        self.logit_bias = backbone.logit_bias
        self.prompts = prompts
        self.adapter = adapter
        self.head = head
        self._text_cache = None

    @property
    def dtype(self):
        return self.text_encoder.dtype

    def text_features(self, image_features=None):
        """Class text features (K, E); cached while gradients are off and neither a prompt parameter
        nor a text-encoder weight has changed, so evaluation encodes the K prompts once, not once
        per batch, also when the text encoder is being fine-tuned.

        A conditional prompt source needs image_features (B, E), the image encoder's output, and
        gives (B, K, E), never cached since they depend on the images.
        """
        if is_conditional(self.prompts):
            if image_features is None:
                raise ValueError(f"{type(self.prompts).__name__} gives per-image text features: pass image_features")
            return self.prompts(self.text_encoder, image_features)
        if torch.is_grad_enabled():
            self._text_cache = None
            return self.prompts(self.text_encoder)
        key = weights_key(self.prompts) + weights_key(self.text_encoder)
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self.prompts(self.text_encoder))
        return self._text_cache[1]

    def encode_image(self, images):
        """Unnormalised image features (B, E), through the prompt source where it prompts the image encoder."""
        images = images.to(self.backbone.image_dtype)
        if prompts_images(self.prompts):
            return self.prompts.encode_image(self.image_encoder, images)
        return self.image_encoder(images)

    def encode(self, images):
        """Unnormalised (image features (B, E), text features (K, E) or, from a conditional prompt
        source, (B, K, E))."""
        image_features = self.encode_image(images)
        return image_features, self.text_features(image_features)

    def forward(self, images):
        image_features, text_features = self.encode(images)
        if self.adapter is not None:
            image_features, text_features = self.adapter(image_features, text_features)
        return self.classify(image_features, text_features)

    def classify(self, image_features, text_features):
        """ClassifierOutput of unnormalised features: image (B, E), text (K, E) or (B, K, E)."""
        scale = self.logit_scale.exp()
        if self.head is None:
            image_features = F.normalize(image_features, dim=-1)
            text_features = F.normalize(text_features, dim=-1)
            logits = clip_logits(scale, image_features, text_features)
            return ClassifierOutput(self._biased(logits), None, image_features, text_features)
        # The head works in float32 whatever CLIP's precision (as the authors' code does).
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        logits, mask = self.head(image_features, text_features, scale.float())
        return ClassifierOutput(self._biased(logits), mask, image_features, text_features)

    def _biased(self, logits):
        return logits if self.logit_bias is None else logits + self.logit_bias
