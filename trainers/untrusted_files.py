"""Reading checkpoints and weights that come from elsewhere (a downloaded run, a colleague's
results tree) as data: nothing in such a file is ever run.

A pickle can name any function and have the unpickler call it (`os.system` included).
`torch.load(weights_only=True)` builds only tensors, plain containers and the classes a call
allows, and refuses any other name before calling anything. When it refuses, torch's message
advises loading the file again with weights_only=False, which would run whatever it names:
`UnloadableFile` says instead what is wrong with the file, in one line that names it.

TorchScript archives are programs (torch.jit.load runs their code), so `torchscript_tensors`
reads an archive's parameters and buffers with an unpickler that knows only tensors.
"""

import io
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict

import torch

# How torch's weights-only unpickler names a function or class it refused.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed|whose module)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)")
# Errors of torch.load that mean "this is not a file torch.save wrote", whatever their type.
_DAMAGED_MARKERS = ("PytorchStreamReader", "magic number", "TorchScript archive", "weights_only")


class UnloadableFile(Exception):
    """A file that is refused or cannot be read; str() is one line naming the file, why, and what to do.
    `refused` is the function or class its pickle names outside the allowed ones (None for a damaged file)."""

    def __init__(self, message, refused=None):
        super().__init__(message)
        self.refused = refused


def _one_line(error):
    return " ".join(str(error).split())


def is_load_failure(error):
    """Whether `error` is torch.load's (or a loader's relay of it) refusal of a file or its failure to parse one."""
    if isinstance(error, (pickle.UnpicklingError, EOFError)):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _DAMAGED_MARKERS)


def unloadable(path, error, subject=None):
    """The UnloadableFile that torch.load's `error` on `path` amounts to, its message starting with `subject`
    (default: the path); never relays torch's advice."""
    subject = subject or path
    text = _one_line(error)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        name = refused.group(1)
        return UnloadableFile(
            f"{subject} was refused: its pickle names {name}, which is neither a tensor nor plain data, so loading it "
            "could run code; nothing in it was run. Weights and checkpoints hold only tensors and plain data: "
            "use the original file from its source.", refused=name)
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return UnloadableFile(f"{subject} cannot be read: {error.strerror or text}.")
    if "TorchScript archive" in text:
        return UnloadableFile(f"{subject} is not a loadable checkpoint: it is a TorchScript archive (a program), not "
                              "tensors and plain data.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        detail = "the file is empty"
    elif match := _UNPICKLER_DETAIL.search(text):
        detail = match.group(1)
    else:
        detail = f"{type(error).__name__}: {text.split('. ')[0]}" if text else type(error).__name__
    if "weights_only" in detail:
        detail = type(error).__name__
    return UnloadableFile(
        f"{subject} is not a loadable checkpoint: it is corrupt, truncated or not written by torch.save ({detail}). "
        "Copy or download it again.")


def load_plain(path, allowed=None):
    """torch.load of `path` onto the CPU as tensors and plain data. `allowed` maps the dotted names of
    the only other classes the file may hold to what is built for them. Raises UnloadableFile."""
    extra = [(built, name) for name, built in (allowed or {}).items()]
    try:
        with torch.serialization.safe_globals(extra), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways; every one refuses the file
        raise unloadable(path, error) from None


# ---- TorchScript archives ------------------------------------------------------------------------

class _ScriptObject:
    """A TorchScript object of an archive (a module): its attributes, inert. Subclassed per class name."""

    qualified_name = ""


class _StorageDtype:
    """What a storage class name (torch.HalfStorage, ...) of an archive stands for: its dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


# The storage class names of tensors in an archive's pickle.
_STORAGE_DTYPES = {f"{kind}Storage": dtype for kind, dtype in (
    ("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}
# Each module class declares which of its tensor attributes are parameters and buffers.
_MODULE_CLASS = re.compile(
    r"^class (\w+)\(Module\):\n  __parameters__ = \[([^\]]*)\]\n  __buffers__ = \[([^\]]*)\]", re.MULTILINE)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles an archive's data.pkl knowing only its module objects, tensors and storages."""

    def __init__(self, archive, folder):
        super().__init__(io.BytesIO(archive.read(f"{folder}/data.pkl")))
        self._archive, self._folder, self._classes = archive, folder, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageDtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not an allowed global")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageDtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = self._archive.read(f"{self._folder}/data/{pid[2]}")
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=pid[1].dtype, _internal=True)


def _declared_tensors(archive, folder):
    """{qualified module class: names of its parameters and buffers}, from the archive's code files (read as text)."""
    declared = {}
    prefix = f"{folder}/code/"
    for name in archive.namelist():
        if name.startswith(prefix) and name.endswith(".py"):
            module = name[len(prefix):-len(".py")].replace("/", ".")
            for match in _MODULE_CLASS.finditer(archive.read(name).decode("utf-8", errors="replace")):
                declared[f"{module}.{match.group(1)}"] = re.findall(r'"(\w+)"', match.group(2) + match.group(3))
    return declared


def _collect(item, prefix, declared, state, seen):
    if id(item) in seen:  # each object once: a crafted archive may share or cycle them
        return
    seen.add(id(item))
    for name in declared.get(item.qualified_name, ()):
        if isinstance(item.__dict__.get(name), torch.Tensor):
            state[prefix + name] = item.__dict__[name]
    for name, value in item.__dict__.items():
        if isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", declared, state, seen)


def torchscript_tensors(path):
    """The state dict (parameters and buffers) of the module in TorchScript archive `path`, read as
    data: no code of the archive is run. Raises UnloadableFile."""
    try:
        with zipfile.ZipFile(path) as archive:
            folder = archive.namelist()[0].split("/")[0]
            if f"{folder}/byteorder" in archive.namelist() and archive.read(f"{folder}/byteorder").strip() != b"little":
                raise UnloadableFile(f"{path} was written on a big-endian machine; save its state dict with torch.save "
                                     "there and use that file.")
            root = _ArchiveUnpickler(archive, folder).load()
            if not isinstance(root, _ScriptObject):
                raise UnloadableFile(f"{path} is not a loadable checkpoint: it is a TorchScript archive without "
                                     "a module.")
            state = {}
            _collect(root, "", _declared_tensors(archive, folder), state, set())
    except UnloadableFile:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged or hostile archive fails in many ways
        raise unloadable(path, error) from None
    return state
