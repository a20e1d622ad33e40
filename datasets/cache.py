"""CoOp's cache pickles (`split_fewshot/shot_K-seed_S.pkl`, ImageNet's `preprocessed.pkl`).

Format: a pickled dict of lists of Dassl `Datum` objects, e.g. {"train": [...], "val": [...]}.
A pickled Datum is the class `dassl.data.datasets.base_dataset.Datum` plus its attribute
dict {_impath, _label, _domain, _classname}.

- Reading needs no Dassl: the unpickler maps that class onto a stand-in and only accepts
  that class, so an unexpected or hostile pickle is rejected instead of executed.
- Writing needs no Dassl either: `encode_datum_pickle` emits the pickle opcodes for exactly
  that structure (protocol 2), so CoOp, MaPLe or our Dassl glue unpickle real `Datum`
  objects from our files whether or not Dassl was importable when we wrote them.

The pickles hold absolute paths. `relocate` maps paths written under an older dataset root
onto the current one, so a moved dataset keeps its caches (and its few-shot samples).
"""

import logging
import os
import pickle
import struct

from datasets.records import Record

logger = logging.getLogger(__name__)

DATUM_MODULE = "dassl.data.datasets.base_dataset"
DATUM_CLASS = "Datum"
# Where Datum can be found by name; old pickles may reference the package.
_DATUM_GLOBALS = {(DATUM_MODULE, DATUM_CLASS), ("dassl.data.datasets", DATUM_CLASS)}
_DATUM_FIELDS = ("_impath", "_label", "_domain", "_classname")


class CacheUnreadable(Exception):
    """The file cannot be used as a cache; the caller rebuilds it."""


class _PickledDatum:
    """Receives the attribute dict of one pickled Datum."""


class _DatumUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DATUM_GLOBALS:
            return _PickledDatum
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset cache")


def _to_record(item):
    state = item.__dict__ if type(item) is _PickledDatum else {}
    try:
        record = Record(state["_impath"], state["_label"], state["_domain"], state["_classname"])
    except KeyError:
        raise CacheUnreadable(f"an entry is {type(item).__name__}, not a Dassl Datum") from None
    if type(record.impath) is not str or type(record.label) is not int:
        raise CacheUnreadable(f"an entry has impath {record.impath!r} and label {record.label!r}")
    return record


def read_datum_pickle(path, keys):
    """{key: [Record]} from a CoOp cache holding at least `keys`; raises CacheUnreadable."""
    try:
        with open(path, "rb") as file:
            content = _DatumUnpickler(file).load()
    except Exception as error:  # a damaged pickle fails in many ways; every one means "rebuild"
        raise CacheUnreadable(f"{type(error).__name__}: {error}") from None
    if not isinstance(content, dict) or any(not isinstance(content.get(key), list) for key in keys):
        raise CacheUnreadable(f"expected a dict with list entries {list(keys)}")
    return {key: [_to_record(item) for item in content[key]] for key in keys}


_U32 = struct.Struct("<I").pack
_I32 = struct.Struct("<i").pack
_DATUM_GLOBAL = f"c{DATUM_MODULE}\n{DATUM_CLASS}\n".encode()  # GLOBAL opcode


def _unicode(value):
    encoded = value.encode("utf-8", "surrogatepass")
    return b"X" + _U32(len(encoded)) + encoded  # BINUNICODE


def encode_datum_pickle(splits):
    """Bytes of a pickle of {key: [Datum]} that CoOp reads, built from {key: [Record]}.

    Each item is an empty Datum (GLOBAL class, EMPTY_TUPLE, NEWOBJ) whose attribute dict is
    then set (BUILD), as `pickle.dumps` writes it. The class, the attribute names and each
    class name are stored once in the memo (LONG_BINPUT) and referenced after (LONG_BINGET).
    """

    def get(index):
        return b"j" + _U32(index)  # LONG_BINGET

    def put(index):
        return b"r" + _U32(index)  # LONG_BINPUT

    # Memo 0 is the class, 1-4 the attribute names; POP ("0") leaves the stack empty again.
    parts = [b"\x80\x02", _DATUM_GLOBAL, put(0), b"0"]  # PROTO 2
    for index, name in enumerate(_DATUM_FIELDS, start=1):
        parts += [_unicode(name), put(index), b"0"]
    new_datum = get(0) + b")\x81}(" + get(1)  # EMPTY_TUPLE NEWOBJ, EMPTY_DICT MARK, "_impath"
    label_key, domain_key, classname_key = get(2), get(3), get(4)
    classname_index = {}

    def classname(value):
        if value in classname_index:
            return get(classname_index[value])
        classname_index[value] = len(_DATUM_FIELDS) + 1 + len(classname_index)
        return _unicode(value) + put(classname_index[value])

    parts.append(b"}(")  # EMPTY_DICT, MARK
    for key, records in splits.items():
        parts += [_unicode(key), b"]("]  # EMPTY_LIST, MARK
        for record in records:
            parts += [
                new_datum, _unicode(record.impath),
                label_key, b"J" + _I32(record.label),  # BININT
                domain_key, b"J" + _I32(record.domain),
                classname_key, classname(record.classname),
                b"ub",  # SETITEMS (the attribute dict), BUILD (it becomes the Datum's __dict__)
            ]
        parts.append(b"e")  # APPENDS
    parts.append(b"u.")  # SETITEMS, STOP
    return b"".join(parts)


def write_datum_pickle(path, splits):
    """Write atomically, so a concurrent reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as file:
            file.write(encode_datum_pickle(splits))
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _old_dataset_dir(stale_path, dataset_dir):
    """The ancestor of stale_path named like dataset_dir whose image exists under dataset_dir."""
    folder = os.path.basename(dataset_dir)
    parts = stale_path.split(os.sep)
    for index, part in enumerate(parts[:-1]):
        if part == folder:
            candidate = os.sep.join(parts[: index + 1])
            if os.path.isfile(dataset_dir + stale_path[len(candidate):]):
                return candidate
    return None


def relocate(splits, dataset_dir):
    """Map paths written under another dataset root onto dataset_dir.

    Returns (splits, old_dataset_dir); old_dataset_dir is None when every path already lies
    under dataset_dir (no file is touched then, so huge caches stay cheap to load). Raises
    CacheUnreadable when some path does not resolve under dataset_dir.
    """
    current = dataset_dir + os.sep
    stale = next((r.impath for rs in splits.values() for r in rs if not r.impath.startswith(current)), None)
    if stale is None:
        return splits, None
    old_dir = _old_dataset_dir(stale, dataset_dir)
    if old_dir is None:
        raise CacheUnreadable(f"{stale} has no counterpart under {dataset_dir}")
    old = old_dir + os.sep
    relocated = {}
    for key, records in splits.items():
        relocated[key] = []
        for record in records:
            impath = record.impath
            if impath.startswith(old):
                impath = os.path.join(dataset_dir, impath[len(old):])
                if not os.path.isfile(impath):
                    raise CacheUnreadable(f"{record.impath} has no counterpart {impath}")
            elif not impath.startswith(current):
                raise CacheUnreadable(f"{impath} lies under neither {old_dir} nor {dataset_dir}")
            relocated[key].append(Record(impath, record.label, record.domain, record.classname))
    return relocated, old_dir


def load_or_build(path, keys, dataset_dir, build):
    """The cached splits at `path`, else `build()` (whose result is then cached).

    A cache written under another root is remapped and rewritten; one that cannot be read
    or remapped is rebuilt. Both cases are logged.
    """
    if os.path.exists(path):
        try:
            splits, old_dir = relocate(read_datum_pickle(path, keys), dataset_dir)
        except CacheUnreadable as reason:
            logger.warning("Rebuilding %s: it cannot be used (%s).", path, reason)
        else:
            if old_dir is None:
                logger.info("Loading cached splits from %s", path)
                return splits
            logger.warning(
                "%s was written for the dataset at %s; its paths were remapped onto %s.", path, old_dir, dataset_dir
            )
            _save(path, splits)
            return splits
    splits = build()
    _save(path, splits)
    return splits


def _save(path, splits):
    try:
        write_datum_pickle(path, splits)
    except OSError as error:
        # A read-only dataset folder costs only the cache: the samples depend on the seed alone.
        logger.warning("Could not write the cache %s (%s); continuing without it.", path, error)
    else:
        logger.info("Saved cached splits to %s", path)
