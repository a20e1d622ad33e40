"""Backbones: one interface (base.Backbone) over the dual encoders this project runs on.

    backbone = load_backbone("ViT-B/16")                                # OpenAI clip
    backbone = load_backbone("open_clip:ViT-B-16/laion2b_s34b_b88k")   # open_clip
    backbone = load_backbone("open_clip:ViT-B-16", weights="/path/to/open_clip_model.safetensors")

Name dispatch is a prefix table: a name starting with a key of BACKENDS goes to that backend's
loader with the rest of the name; any other name (an OpenAI model name or a local OpenAI
checkpoint file) goes to the clip backend. A backend is a module with a function
`load(spec, weights="", cache_dir=None, download=True) -> Backbone`; add one with
register_backend(prefix, ".module") (relative to this package: plugged into a host program, this
package is not importable as `trainers`).
"""

import importlib

from .base import (  # noqa: F401  (the interface, re-exported)
    OBJECTIVES,
    Backbone,
    BackboneError,
    Preprocess,
    PromptSites,
    TextEncoder,
    Tokenizer,
    describe_signature,
    same_backbone,
)

# prefix -> module with load(spec, weights, cache_dir, download); imported only when used.
BACKENDS = {
    "open_clip:": ".open_clip_backend",
    "hf:": ".hf",
}
DEFAULT_BACKEND = ".openai_clip"


def register_backend(prefix, module_path):
    BACKENDS[prefix] = module_path


def split_name(name):
    """(backend module path, the name without its prefix)."""
    for prefix, module_path in BACKENDS.items():
        if name.startswith(prefix):
            return module_path, name[len(prefix):]
    return DEFAULT_BACKEND, name


def load_backbone(name, weights="", cache_dir=None, download=True):
    """The Backbone that MODEL.BACKBONE.NAME (and .WEIGHTS, .CACHE_DIR) name, on the CPU in eval mode."""
    module_path, spec = split_name(name)
    try:
        backend = importlib.import_module(module_path, __name__)
    except ModuleNotFoundError as error:
        raise BackboneError(
            f"MODEL.BACKBONE.NAME {name!r} needs the Python package {error.name!r}, which is not installed: "
            "pip install -r requirements.txt (open_clip_torch, transformers)."
        ) from None
    return backend.load(spec, weights=weights, cache_dir=cache_dir, download=download)


def as_backbone(model):
    """A Backbone as it is; a bare clip.model.CLIP (as tests and older callers pass) wrapped."""
    if isinstance(model, Backbone):
        return model
    from .openai_clip import ClipBackbone, is_clip_model

    if not is_clip_model(model):
        raise TypeError(f"Expected a Backbone or a clip CLIP model, got {type(model).__name__}")
    return ClipBackbone(model)


# The input settings every shipped config carries: OpenAI CLIP's preprocessing.
SHIPPED_INPUT = {
    "SIZE": (224, 224),
    "PIXEL_MEAN": (0.48145466, 0.4578275, 0.40821073),
    "PIXEL_STD": (0.26862954, 0.26130258, 0.27577711),
    "INTERPOLATION": "bicubic",
}


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-7 for x, y in zip(a, b, strict=True))


def follow_preprocess(cfg, preprocess):
    """(cfg, {key: value changed}): INPUT.SIZE, PIXEL_MEAN, PIXEL_STD and INTERPOLATION set to the
    backbone's own preprocessing wherever they hold the OpenAI CLIP values the shipped configs carry;
    a value set to anything else was chosen by the user and is kept. INPUT.RESIZE_MODE "auto" (where
    the config has the key) becomes the backbone's resize mode; any other value is the user's. For
    OpenAI models only "auto" changes, to "shortest" (Dassl's own test transform)."""
    wanted = {
        "SIZE": (preprocess.image_size, preprocess.image_size),
        "PIXEL_MEAN": tuple(preprocess.mean),
        "PIXEL_STD": tuple(preprocess.std),
        "INTERPOLATION": preprocess.interpolation,
    }
    changed = {
        key: value for key, value in wanted.items()
        if _same(cfg.INPUT[key], SHIPPED_INPUT[key]) and not _same(cfg.INPUT[key], value)
    }
    if cfg.INPUT.get("RESIZE_MODE") == "auto":
        changed["RESIZE_MODE"] = preprocess.resize_mode
    if not changed:
        return cfg, changed
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changed.items():
        cfg.INPUT[key] = value if isinstance(value, str) else type(cfg.INPUT[key])(value)
    cfg.freeze()
    return cfg, changed
