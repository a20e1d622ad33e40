"""Loading CLIP: the one place where weights are found, downloaded, read and checked.

`load_clip(name_or_path)` accepts a name from `clip.available_models()` (fetched into a cache
folder by the clip package's own downloader) or the path of a local file: a TorchScript
archive as OpenAI ships them, or a plain state dict (`clip.load` cannot read the latter on
current torch because it retries on a half-consumed file object). Files are read as data, never
run: only OpenAI's own archives (known by their SHA-256) go through torch.jit.load. The model
comes back on the CPU, in eval mode, with the clip package's fp16 linear/conv weights;
`trainers.model.precision` decides the working dtype.
"""

import contextlib
import hashlib
import logging
import os
import socket
import urllib.error
import warnings
import zipfile

import torch

from ...untrusted_files import UnloadableFile, load_plain, torchscript_tensors
from .base import BackboneError
from .openai_package import clip_api, clip_model

logger = logging.getLogger(__name__)

CACHE_ENV = "CLIP_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 60

# Keys every CLIP state dict has, whatever the backbone.
_REQUIRED_KEYS = ("positional_embedding", "text_projection", "token_embedding.weight", "ln_final.weight")


class CLIPLoadError(BackboneError):
    """Weights that cannot be found, fetched or read; the message says what to do."""


@contextlib.contextmanager
def _socket_timeout(seconds):
    """clip's downloader opens its connection without a timeout; a network that drops packets
    would otherwise hang the run instead of ending in the offline message."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def default_cache_dir():
    """$CLIP_CACHE_DIR, else the clip package's own default (~/.cache/clip)."""
    return os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/clip")


def cached_weights_path(name, cache_dir=None):
    """Where the clip downloader keeps the file of a named model."""
    url = clip_api._MODELS[name]
    return os.path.join(cache_dir or default_cache_dir(), os.path.basename(url))


def resolve_weights(name_or_path, cache_dir=None, download=True):
    """Return the path of the weights file for a model name or a file path."""
    if name_or_path in clip_api._MODELS:
        cache_dir = cache_dir or default_cache_dir()
        target = cached_weights_path(name_or_path, cache_dir)
        if not download and not os.path.isfile(target):
            raise CLIPLoadError(_missing_message(name_or_path, target, "downloading is disabled"))
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                return clip_api._download(clip_api._MODELS[name_or_path], cache_dir)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise CLIPLoadError(_missing_message(name_or_path, target, error)) from None
        except RuntimeError as error:  # the downloader's checksum failure
            raise CLIPLoadError(
                f"CLIP weights for {name_or_path!r} in {target} failed the checksum ({error}). "
                "Delete the file and run again to download it afresh."
            ) from None
    if os.path.isfile(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    known = ", ".join(clip_api.available_models())
    raise CLIPLoadError(
        f"Unknown CLIP backbone {name_or_path!r}: it is neither a model name ({known}) "
        "nor an existing checkpoint file. Set MODEL.BACKBONE.NAME to one of the names or to "
        "the path of a .pt file."
    )


def _missing_message(name, target, reason):
    url = clip_api._MODELS[name]
    return (
        f"CLIP weights for {name!r} are not in {target} and could not be downloaded ({reason}). "
        f"On a machine with internet access download {url} and copy it to {target}, "
        f"or point ${CACHE_ENV} (or MODEL.BACKBONE.CACHE_DIR) at a folder that holds it, "
        "or set MODEL.BACKBONE.NAME to the path of the file."
    )


def _is_torchscript(path):
    """TorchScript archives are zip files with a code/ folder; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _is_openai_release(path):
    """Whether the file is one OpenAI publishes: clip's download URLs hold their SHA-256 (.../<sha256>/<file>)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() in {url.split("/")[-2] for url in clip_api._MODELS.values()}


def _released_archive_state_dict(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # OpenAI ships TorchScript files
            return torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError) as error:
        raise CLIPLoadError(
            f"Cannot read CLIP weights from {path} as TorchScript ({_first_line(error)}). The file is corrupt: "
            "delete it and download it again."
        ) from None


def read_state_dict(path, verified_release=False):
    """Read a CLIP state dict from a TorchScript archive or a plain `torch.save` file, as data.

    TorchScript archives are programs: only OpenAI's own files (`verified_release`: clip's downloader
    has checked the SHA-256 already) are loaded with torch.jit.load, as clip.load does; any other
    archive gives its parameters and buffers without running its code."""
    try:
        if not _is_torchscript(path):
            loaded = load_plain(path)
        elif verified_release or _is_openai_release(path):
            return _released_archive_state_dict(path)
        else:
            return torchscript_tensors(path)
    except UnloadableFile as error:
        raise CLIPLoadError(str(error)) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return loaded


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def build_clip(state_dict, source="state dict"):
    if not isinstance(state_dict, dict) or not all(key in state_dict for key in _REQUIRED_KEYS):
        raise CLIPLoadError(
            f"{source} is not a CLIP checkpoint: it lacks the keys {', '.join(_REQUIRED_KEYS)}."
        )
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    try:
        return clip_model.build_model(state_dict).eval()
    except (KeyError, RuntimeError, AssertionError) as error:
        raise CLIPLoadError(f"{source} does not describe a CLIP model clip can build: {_first_line(error)}") from None


def load_clip(name_or_path, cache_dir=None, download=True):
    """Load CLIP on the CPU (eval mode, clip's fp16 linear/conv weights)."""
    path = resolve_weights(name_or_path, cache_dir=cache_dir, download=download)
    model = build_clip(read_state_dict(path, verified_release=name_or_path in clip_api._MODELS), source=path)
    logger.info("Loaded CLIP %s from %s (%s)", name_or_path, path, describe_clip(model))
    return model


def clip_signature(model):
    """The widths that decide whether trained weights fit this backbone."""
    visual = model.visual
    return {
        "embed_dim": int(model.text_projection.shape[1]),
        "text_width": int(model.ln_final.weight.shape[0]),
        "vision_width": int(_vision_width(visual)),
        "vision": "ViT" if hasattr(visual, "transformer") else "ResNet",
        "image_size": int(visual.input_resolution),
    }


def _vision_width(visual):
    if hasattr(visual, "transformer"):
        return visual.transformer.width
    return visual.layer1[0].conv1.weight.shape[0]


def describe_clip(model):
    sig = clip_signature(model)
    return (
        f"{sig['vision']} image encoder, width {sig['vision_width']}, text width {sig['text_width']}, "
        f"embedding {sig['embed_dim']}, {sig['image_size']} px"
    )
