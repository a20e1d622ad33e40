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
import logging

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

logger = logging.getLogger(__name__)


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


# The INPUT keys that INPUT.PREPROCESS gives to the backbone or leaves to the config (RESIZE_MODE has its own "auto").
PREPROCESS_KEYS = ("SIZE", "PIXEL_MEAN", "PIXEL_STD", "INTERPOLATION")


def is_openai_clip(name):
    """Whether MODEL.BACKBONE.NAME goes to the OpenAI clip backend (a name without a registered prefix)."""
    return split_name(name)[0] == DEFAULT_BACKEND


def preprocess_source(cfg):
    """Whose values INPUT.SIZE, PIXEL_MEAN, PIXEL_STD and INTERPOLATION take, "backbone" or "config",
    as INPUT.PREPROCESS says. "auto" is "config" for OpenAI CLIP, whose preprocessing the shipped
    configs carry, and "backbone" for any other backbone. Known from the name, before loading."""
    if cfg.INPUT.PREPROCESS != "auto":
        return cfg.INPUT.PREPROCESS
    return "config" if is_openai_clip(cfg.MODEL.BACKBONE.NAME) else "backbone"


def backbone_input_keys(cfg):
    """The INPUT keys whose values the loaded backbone gives under `cfg`, whatever the config says:
    PREPROCESS_KEYS where preprocess_source says "backbone", and RESIZE_MODE where it is "auto"
    (where the config has the key)."""
    keys = PREPROCESS_KEYS if preprocess_source(cfg) == "backbone" else ()
    return keys + (("RESIZE_MODE",) if cfg.INPUT.get("RESIZE_MODE") == "auto" else ())


def follow_preprocess(cfg, preprocess):
    """(cfg, {key: value changed}): the config with the INPUT keys of backbone_input_keys set to the
    backbone's own preprocessing `preprocess` (a Preprocess); the other INPUT keys stay as the config
    has them. What the backbone changed is logged."""
    own = {
        "SIZE": (preprocess.image_size, preprocess.image_size),
        "PIXEL_MEAN": tuple(preprocess.mean),
        "PIXEL_STD": tuple(preprocess.std),
        "INTERPOLATION": preprocess.interpolation,
        "RESIZE_MODE": preprocess.resize_mode,
    }
    changed = {}
    for key in backbone_input_keys(cfg):
        # In the config's own type: Dassl's SIZE is a tuple, its mean and std lists.
        value = own[key] if isinstance(own[key], str) else type(cfg.INPUT[key])(own[key])
        if value != cfg.INPUT[key]:
            changed[key] = value
    _log_preprocess(cfg, changed)
    if not changed:
        return cfg, changed
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changed.items():
        cfg.INPUT[key] = value
    cfg.freeze()
    return cfg, changed


def _log_preprocess(cfg, changed):
    name, setting = cfg.MODEL.BACKBONE.NAME, cfg.INPUT.PREPROCESS
    if preprocess_source(cfg) == "backbone":
        values = ", ".join(f"INPUT.{key} {value}" for key, value in changed.items()) or "no INPUT value changed"
        logger.info("Input preprocessing of %s: the backbone's own (INPUT.PREPROCESS %s): %s; "
                    "INPUT.PREPROCESS config keeps the config's values.", name, setting, values)
    else:  # only an "auto" resize mode changes
        mode = f"; INPUT.RESIZE_MODE auto: the backbone's {changed['RESIZE_MODE']}" if changed else ""
        logger.info("Input preprocessing of %s: the config's INPUT values (INPUT.PREPROCESS %s)%s.", name, setting, mode)


def check_input_size(input_size, name, preprocess):
    """Refuse an INPUT.SIZE other than the image size of the model MODEL.BACKBONE.NAME `name` takes."""
    expected = preprocess.image_size
    size = tuple(input_size)
    if size != (expected, expected):
        raise BackboneError(
            f"INPUT.SIZE is {size} but {name} takes {expected} px images: set `INPUT.SIZE ({expected},{expected})` "
            "on the command line or in the config, or `INPUT.PREPROCESS backbone` to use the model's own "
            "preprocessing."
        )
