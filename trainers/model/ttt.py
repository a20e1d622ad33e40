"""Test-time training of a CLIPClassifier, one test image at a time (TPT's episodic protocol).

For each test image the original (through the usual test transform) and N random views are
encoded once: the encoders are frozen, so every optimisation step re-runs only the head, and
the text encoder only when the prompt context adapts. Before the first step the views (the
original included) are ranked by the entropy of their predictions and the most confident
fraction is kept; each step then minimises the entropy of the kept views' averaged
probabilities (TPT's marginal entropy) on the adapted parameters. The original is predicted
with the adapted parameters, and those parameters and the optimisers' state are restored from
an in-memory snapshot, so that every image starts from the same model.

Nothing here needs Dassl; `trainers.ttt_trainers` holds the Dassl glue.
"""

import contextlib
import copy
import datetime
import math
import time
from collections import namedtuple

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .module_state import is_trained
from .prompts import is_conditional

# ---- views ------------------------------------------------------------------------------------

# AugMix as TPT applies it: a convex mix of the view and three chains of one to three operations,
# drawn from the nine below (AugMix leaves out colour, contrast, brightness and sharpness, which
# overlap with ImageNet-C). Each operation's strength is drawn in [0.1, severity] on AugMix's
# scale of 10; TPT uses severity 1, i.e. mild operations.
AUGMIX_WIDTH = 3
AUGMIX_MAX_DEPTH = 3
AUGMIX_SEVERITY = 1


def _uniform(low, high):
    return low + (high - low) * torch.rand(()).item()


def _random_sign(value):
    return value if torch.rand(()).item() < 0.5 else -value


def _affine(image, coefficients):
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)


def _autocontrast(image, level):
    return ImageOps.autocontrast(image)


def _equalize(image, level):
    return ImageOps.equalize(image)


def _posterize(image, level):
    return ImageOps.posterize(image, 4 - int(level * 4 / 10))


def _solarize(image, level):
    return ImageOps.solarize(image, 256 - int(level * 256 / 10))


def _rotate(image, level):
    return image.rotate(_random_sign(int(level * 30 / 10)), resample=Image.Resampling.BILINEAR)


def _shear_x(image, level):
    return _affine(image, (1, _random_sign(level * 0.3 / 10), 0, 0, 1, 0))


def _shear_y(image, level):
    return _affine(image, (1, 0, 0, _random_sign(level * 0.3 / 10), 1, 0))


def _translate_x(image, level):
    return _affine(image, (1, 0, _random_sign(int(level * image.width / 3 / 10)), 0, 1, 0))


def _translate_y(image, level):
    return _affine(image, (1, 0, 0, 0, 1, _random_sign(int(level * image.height / 3 / 10))))


AUGMIX_OPERATIONS = (
    _autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x, _translate_y,
)


def _pixels(image):
    """A PIL image as a (C, H, W) float32 tensor in pixel units (0..255)."""
    return TF.pil_to_tensor(image).float()


def augmix(image, severity=AUGMIX_SEVERITY):
    """AugMix of a PIL image, as a (C, H, W) float32 tensor in pixel units.

    TPT mixes after normalising; the mixing weights sum to 1, so mixing the pixels and
    normalising afterwards gives the same image at a quarter of the cost. Randomness comes from
    torch's generator, which DataLoader seeds in every worker.
    """
    chain_weights = torch.distributions.Dirichlet(torch.ones(AUGMIX_WIDTH)).sample().tolist()
    keep = torch.distributions.Beta(1.0, 1.0).sample().item()
    mixed = keep * _pixels(image)
    for weight in chain_weights:
        augmented = image
        for _ in range(int(torch.randint(1, AUGMIX_MAX_DEPTH + 1, ()))):
            operation = AUGMIX_OPERATIONS[int(torch.randint(len(AUGMIX_OPERATIONS), ()))]
            augmented = operation(augmented, _uniform(0.1, severity))
        mixed += (1 - keep) * weight * _pixels(augmented)
    return mixed


class TestTimeViews:
    """Turns one test image (PIL) into a (1 + n_views, C, H, W) tensor: the original through
    `original_transform` (the usual test transform), then n_views random views.

    A view is a random resized crop (torchvision's default scale and bilinear resampling) and
    a random horizontal flip: TPT's views for ImageNet and its variants. With augmix=True AugMix
    is applied on top: TPT's views for the other datasets. The views are scaled to [0, 1] and
    passed through `normalize` (a tensor transform, or None) together, in one batched operation.
    """

    def __init__(self, original_transform, size, n_views=63, augmix=False, normalize=None):
        if n_views < 0:
            raise ValueError(f"n_views must be >= 0, got {n_views}")
        self.original_transform = original_transform
        self.crop = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
        self.n_views = n_views
        self.augmix = augmix
        self.normalize = normalize

    def view(self, image):
        """One random view, (C, H, W) in pixel units."""
        crop = self.crop(image)
        return augmix(crop) if self.augmix else _pixels(crop)

    def __call__(self, image):
        original = self.original_transform(image).unsqueeze(0)
        if not self.n_views:
            return original
        views = torch.stack([self.view(image) for _ in range(self.n_views)]).div_(255)
        if self.normalize is not None:
            views = self.normalize(views)
        return torch.cat([original, views.to(original.dtype)])


# ---- objective and selection ---------------------------------------------------------------------

def view_entropy(logits):
    """Entropy (nats) of the softmax of each row of (N, K) logits, in float32 at least."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def marginal_entropy(logits):
    """Entropy of the averaged prediction of N views, H(mean_n softmax(logits_n)): TPT's objective.

    Averaged in log space (log-sum-exp of the log-probabilities), so tiny probabilities keep
    their gradient.
    """
    log_probs = logits.float().log_softmax(dim=-1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    return -(log_mean.exp() * log_mean).sum()


def check_fraction(fraction):
    if not 0 < fraction <= 1:
        raise ValueError(f"The fraction of confident views to keep must be in (0, 1], got {fraction}")


def num_confident(num_views, fraction):
    """How many views `fraction` keeps: floor(fraction * num_views) as TPT (6 of 64 at 0.1), at least 1."""
    check_fraction(fraction)
    # The epsilon keeps products meant to be whole from rounding down (0.29 * 100 = 28.999999999999996).
    return max(1, math.floor(fraction * num_views + 1e-9))


def select_confident_views(logits, fraction):
    """Indices of the num_confident(N, fraction) rows of (N, K) logits with the lowest entropy,
    most confident first; among equal entropies the lower index comes first."""
    entropy = view_entropy(logits.detach())
    order = torch.sort(entropy, stable=True).indices
    return order[: num_confident(len(entropy), fraction)]


# ---- the per-image loop ----------------------------------------------------------------------------

class OptimizationSnapshot:
    """The parameters some optimisers update and the optimisers' own state (moments, step counts,
    learning rates), copied in memory; restore() puts them back bit for bit."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        self.parameters = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        self.values = [p.detach().clone() for p in self.parameters]
        self.states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]

    def restore(self):
        with torch.no_grad():
            for parameter, value in zip(self.parameters, self.values, strict=False):
                parameter.copy_(value)  # in place: bumps _version, so cached text features are recomputed
        for optimizer, state in zip(self.optimizers, self.states, strict=False):
            # load_state_dict may adopt the given tensors as its state and update them in place later:
            # hand it a copy so that the snapshot stays intact.
            optimizer.load_state_dict(copy.deepcopy(state))
            optimizer.zero_grad(set_to_none=True)


TestTimePrediction = namedtuple("TestTimePrediction", ["initial", "adapted"])


class TestTimeAdapter:
    """Test-time training of `classifier` (a CLIPClassifier) on one image at a time.

    optimizers: torch optimisers over the parameters to adapt (the head's, and the prompt
    context's when it adapts); the other parameters must not require gradients. Their current
    state, taken at construction (so after any trained weights were loaded), is the state
    every image starts from. autocast: a context-manager factory for the forward passes;
    scaler: an optional torch GradScaler (mixed precision).
    """

    def __init__(self, classifier, optimizers, steps=1, confident_fraction=0.1,
                 autocast=contextlib.nullcontext, scaler=None):
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a whole number >= 0, got {steps}")
        check_fraction(confident_fraction)
        if classifier.adapter is not None:
            raise ValueError("Test-time training of classifiers with feature adapters is not supported")
        if is_conditional(classifier.prompts):
            # The adapter encodes the class features once for all views; these prompts make them per view.
            raise ValueError(
                "Test-time training of classifiers with image-conditioned prompts "
                f"({type(classifier.prompts).__name__}, e.g. CoCoOp's) is not supported"
            )
        self.classifier = classifier
        self.optimizers = list(optimizers)
        self.steps = int(steps)
        self.confident_fraction = confident_fraction
        self.autocast = autocast
        self.scaler = scaler
        # Without a learnable context the text features never change: encode them once, without graph.
        self.adapts_prompts = is_trained(classifier.prompts)
        self.snapshot = OptimizationSnapshot(self.optimizers)

    def encode(self, views):
        """Image features of (N, C, H, W) views, computed once per image and without gradients."""
        with torch.no_grad(), self.autocast():
            return self.classifier.encode_image(views)

    def text_features(self):
        """The class text features, with a graph only when the context adapts."""
        if self.adapts_prompts:
            return self.classifier.text_features()
        with torch.no_grad():
            return self.classifier.text_features()

    def classify(self, image_features, text_features):
        with self.autocast():
            return self.classifier.classify(image_features, text_features).logits

    def logits(self, image_features):
        return self.classify(image_features, self.text_features())

    def adapt(self, image_features):
        """Run the optimisation steps on the views' features (the original first).

        Returns (logits of the original before any step (1, K), indices of the kept views): the
        views are selected once, before the first step, and kept for the others, as in TPT.
        """
        text_features = self.text_features()
        # Ranking the views needs no gradients; only the few kept views are classified again with
        # a graph, so the backward pass runs over ~10% of the views.
        with torch.no_grad():
            logits = self.classify(image_features, text_features.detach())
        selected = select_confident_views(logits, self.confident_fraction)
        self._step(marginal_entropy(self.classify(image_features[selected], text_features)))
        for _ in range(self.steps - 1):
            self._step(marginal_entropy(self.logits(image_features[selected])))
        return logits[:1], selected

    def _step(self, loss):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
            self.scaler.update()

    def predict(self, image_features):
        with torch.no_grad():
            return self.logits(image_features)

    def reset(self):
        self.snapshot.restore()

    def adapt_and_predict(self, views):
        """views: (1 + N, C, H, W), the original first. Returns TestTimePrediction(initial, adapted):
        the (1, K) logits of the original before and after test-time training; afterwards the
        adapted parameters and optimiser state are back in their initial state."""
        image_features = self.encode(views)
        if self.steps == 0:
            logits = self.predict(image_features[:1])
            return TestTimePrediction(logits, logits)
        try:
            initial, _ = self.adapt(image_features)
            return TestTimePrediction(initial, self.predict(image_features[:1]))
        finally:
            self.reset()


class TestTimeTally:
    """Running accuracy before (zero-shot) and after test-time training, with speed and ETA."""

    def __init__(self, total):
        self.total = total
        self.seen = 0
        self.correct_initial = 0
        self.correct_adapted = 0
        self.started = time.monotonic()

    def update(self, initial_logits, adapted_logits, labels):
        labels = labels.to(adapted_logits.device)
        self.correct_initial += int((initial_logits.argmax(dim=-1) == labels).sum())
        self.correct_adapted += int((adapted_logits.argmax(dim=-1) == labels).sum())
        self.seen += len(labels)

    @staticmethod
    def percent(count, total):
        return 100.0 * count / total if total else 0.0

    @property
    def zero_shot_accuracy(self):
        return self.percent(self.correct_initial, self.seen)

    @property
    def accuracy(self):
        return self.percent(self.correct_adapted, self.seen)

    def progress(self):
        elapsed = time.monotonic() - self.started
        per_image = elapsed / max(self.seen, 1)
        eta = per_image * max(self.total - self.seen, 0)
        return (
            f"test-time training [{self.seen}/{self.total}] acc {self.accuracy:.2f}% "
            f"(zero-shot {self.zero_shot_accuracy:.2f}%) time/image {per_image:.3f}s "
            f"elapsed {datetime.timedelta(seconds=int(elapsed))} eta {datetime.timedelta(seconds=int(eta))}"
        )
