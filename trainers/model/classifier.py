"""A dual encoder as a classifier: image encoder, a prompt source for the class texts, optionally a
feature adapter and the RAda head. Every trainer composes one of these."""

from collections import namedtuple

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import as_backbone
from .module_state import weights_key

ClassifierOutput = namedtuple("ClassifierOutput", ["logits", "mask"])


class CLIPClassifier(nn.Module):
    """Returns ClassifierOutput(logits (B, K), mask (B, K, D) or None).

    backbone: a Backbone (or a bare clip CLIP model). prompts: a module with forward(text_encoder) -> (K, E) text features.
    adapter: optional module with forward(image_features, text_features) -> both, applied
    before normalisation. head: optional RAdaHead; without it the logits are CLIP's,
    s * f @ t^T, computed as CoOp computes them. A backbone with a logit bias (SigLIP) adds it to
    the logits, with or without the head.
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

    def text_features(self):
        """Class text features; cached while gradients are off and neither a prompt parameter nor
        a text-encoder weight has changed, so evaluation encodes the K prompts once, not once per
        batch, also when the text encoder is being fine-tuned."""
        if torch.is_grad_enabled():
            self._text_cache = None
            return self.prompts(self.text_encoder)
        key = weights_key(self.prompts) + weights_key(self.text_encoder)
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self.prompts(self.text_encoder))
        return self._text_cache[1]

    def encode_image(self, images):
        return self.image_encoder(images.to(self.backbone.image_dtype))

    def encode(self, images):
        """Unnormalised (image features (B, E), text features (K, E)); subclasses that
        prompt the encoders differently override this."""
        return self.encode_image(images), self.text_features()

    def forward(self, images):
        image_features, text_features = self.encode(images)
        if self.adapter is not None:
            image_features, text_features = self.adapter(image_features, text_features)
        return self.classify(image_features, text_features)

    def classify(self, image_features, text_features):
        scale = self.logit_scale.exp()
        if self.head is None:
            image_features = F.normalize(image_features, dim=-1)
            text_features = F.normalize(text_features, dim=-1)
            return ClassifierOutput(self._biased(scale * image_features @ text_features.t()), None)
        # The head works in float32 whatever CLIP's precision (as the authors' code does).
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        logits, mask = self.head(image_features, text_features, scale.float())
        return ClassifierOutput(self._biased(logits), mask)

    def _biased(self, logits):
        return logits if self.logit_bias is None else logits + self.logit_bias
