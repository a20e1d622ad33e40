"""Backbones: one interface (base.Backbone) over the dual encoders this project runs on.

    backbone = load_backbone("ViT-B/16")                                # OpenAI clip
    backbone = load_backbone("open_clip:ViT-B-16/laion2b_s34b_b88k")   # open_clip
    backbone = load_backbone("open_clip:ViT-B-16", weights="/path/to/open_clip_model.safetensors")

Name dispatch is a prefix table: a name starting with a key of BACKENDS goes to that backend's
loader with the rest of the name; any other name (an OpenAI model name or a local OpenAI
checkpoint file) goes to the clip backend. A backend is a module with a function
`load(spec, weights="", cache_dir=None, download=True) -> Backbone`; add one with
register_backend(prefix, "module.path").
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
)

# prefix -> module with load(spec, weights, cache_dir, download); imported only when used.
BACKENDS = {
    "open_clip:": "trainers.core.backbones.open_clip_backend",
}
DEFAULT_BACKEND = "trainers.core.backbones.openai_clip"


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
    return importlib.import_module(module_path).load(spec, weights=weights, cache_dir=cache_dir, download=download)


def as_backbone(model):
    """A Backbone as it is; a bare clip.model.CLIP (as tests and older callers pass) wrapped."""
    if isinstance(model, Backbone):
        return model
    from .openai_clip import ClipBackbone, is_clip_model

    if not is_clip_model(model):
        raise TypeError(f"Expected a Backbone or a clip CLIP model, got {type(model).__name__}")
    return ClipBackbone(model)
