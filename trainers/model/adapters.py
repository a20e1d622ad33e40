"""Feature adapters on CLIP's frozen image and text features (CLIP-Adapter, Gao et al. 2021).

Each adapter A is a bottleneck MLP without biases, relu(W_up relu(W_down x)), with
width // reduction hidden units and PyTorch's default init. The adapted feature blends it with
the original one before the L2 normalisation: (1 - ratio) * f + ratio * A(f). CLIP-Adapter uses
ratio 0.2. The RAda authors use f + A(f), which ratio 0.5 reproduces exactly: 0.5 * (f + A(f)) has
the same direction, and the normalisation that follows removes the factor.

The RAda authors' code also sets W_up to zero at the start. Behind the final relu that adapter
never trains: its output is relu(0) and relu's gradient at 0 is 0, so neither W_up nor W_down
ever receives a non-zero gradient. The default init is therefore kept for every trainer.
"""

from torch import nn

from .precision import autocast_enabled


class Bottleneck(nn.Module):
    """relu(W_up relu(W_down x))."""

    def __init__(self, width, reduction=4):
        super().__init__()
        hidden = width // reduction
        if reduction < 1 or hidden < 1:
            raise ValueError(f"Adapter reduction {reduction} does not fit features of width {width}")
        # Named `fc` with the layers at 0 and 2 as in CLIP-Adapter and the RAda authors' code, so
        # their trained adapters load unchanged.
        self.fc = nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, width, bias=False),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.fc(x)


class FeatureAdapter(nn.Module):
    """The `adapter` of a CLIPClassifier: adapts image features and, unless adapt_text is False,
    text features, each with its own bottleneck. Returns both in the adapters' dtype (float32
    master weights), so half-precision CLIP features meet them without loss."""

    def __init__(self, width, reduction=4, ratio=0.2, adapt_text=True):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"Adapter residual ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.adapter_image = Bottleneck(width, reduction)
        self.adapter_text = Bottleneck(width, reduction) if adapt_text else None

    def extra_repr(self):
        return f"ratio={self.ratio}"

    def forward(self, image_features, text_features):
        dtype = self.adapter_image.fc[0].weight.dtype
        if not autocast_enabled(image_features.device.type):
            image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        image_features = self._blend(self.adapter_image, image_features)
        if self.adapter_text is not None:
            text_features = self._blend(self.adapter_text, text_features)
        return image_features, text_features

    def _blend(self, adapter, features):
        return (1 - self.ratio) * features + self.ratio * adapter(features)
