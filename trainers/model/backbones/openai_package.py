"""The installed OpenAI `clip` package, whatever the host program puts on sys.path under that name.

MaPLe and PromptSRC ship a modified `clip` package of their own (their build_model needs a
`design_details` argument). Plugged into such a checkout, `import clip` finds theirs; this module
therefore locates the files of the installed `openai-clip` distribution and loads them under a
private name, unless `clip` already is that distribution.
"""

import importlib.metadata
import importlib.util
import os
import sys
import warnings

from .base import BackboneError

PRIVATE_NAME = "_rada_openai_clip"
DISTRIBUTIONS = ("openai-clip", "clip")


def _installed_package_dir():
    for name in DISTRIBUTIONS:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in distribution.files or ():
            if str(file).replace("\\", "/") == "clip/__init__.py":
                return os.path.dirname(os.path.abspath(distribution.locate_file(file)))
    spec = importlib.util.find_spec("clip")  # an editable or vendored install without metadata
    if spec is not None and spec.origin:
        return os.path.dirname(os.path.abspath(spec.origin))
    raise BackboneError(
        "The OpenAI clip package is not installed: pip install openai-clip (see requirements.txt)."
    )


def _load():
    package_dir = _installed_package_dir()
    for name in ("clip", PRIVATE_NAME):
        module = sys.modules.get(name)
        if module is not None and os.path.dirname(os.path.abspath(module.__file__ or "")) == package_dir:
            return module
    spec = importlib.util.spec_from_file_location(
        PRIVATE_NAME, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_NAME] = module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # clip imports the deprecated pkg_resources
        spec.loader.exec_module(module)
    return module


_package = _load()
# The package's modules: clip_api (load, tokenize, available_models, the download table), model
# (CLIP, build_model, convert_weights) and the tokenizer.
clip_api = sys.modules[f"{_package.__name__}.clip"]
clip_model = sys.modules[f"{_package.__name__}.model"]
SimpleTokenizer = sys.modules[f"{_package.__name__}.simple_tokenizer"].SimpleTokenizer
