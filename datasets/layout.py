"""Checking a dataset folder against its CoOp layout and explaining what is missing."""

import os

from datasets.errors import DatasetLayoutError
from datasets.specs import FEWSHOT_FOLDER, Entry

FEWSHOT_ENTRY = Entry(f"{FEWSHOT_FOLDER}/", "written on first use: shot_<K>-seed_<SEED>.pkl", required=False)


def layout_tree(spec, root):
    """The expected folder tree under root, one line per entry, with notes."""
    children = {}
    for entry in spec.entries:
        node = children
        for part in entry.path.rstrip("/").split("/"):
            node = node.setdefault(part, {})
        node[None] = entry
    if not spec.test_only:
        children[FEWSHOT_FOLDER] = {None: FEWSHOT_ENTRY}

    rows = [(f"{os.path.abspath(os.path.expanduser(root))}/", "<- DATASET.ROOT (--root)"), (f"└── {spec.folder}/", "")]

    def walk(node, indent):
        names = [name for name in node if name is not None]
        for position, name in enumerate(names):
            last = position == len(names) - 1
            entry = node[name].get(None)
            is_folder = entry is None or entry.path.endswith("/")
            label = f"{indent}{'└── ' if last else '├── '}{name}{'/' if is_folder else ''}"
            rows.append((label, entry.note if entry is not None else ""))
            walk(node[name], indent + ("    " if last else "│   "))

    walk(children, "    ")
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {note}".rstrip() for label, note in rows)


def prepare_command(spec, root):
    return f"python -m datasets.prepare {spec.stem} --root {root}"


def layout_error(spec, root, missing, problem=None):
    """A DatasetLayoutError naming `missing`, with the expected tree and how to get it."""
    problem = problem or f"{missing} does not exist."
    message = (
        f"{spec.name}: {problem}\n"
        f"Expected layout:\n{layout_tree(spec, root)}\n"
        f"To download what can be downloaded and check the rest, run:\n  {prepare_command(spec, root)}"
    )
    return DatasetLayoutError(message, missing)


def first_missing(spec, root):
    """The first missing path among root, the dataset folder and the required entries."""
    root_dir = os.path.abspath(os.path.expanduser(root))
    candidates = [(root_dir, True), (spec.dataset_dir(root), True)]
    for entry in spec.entries:
        if entry.required:
            candidates.append((spec.path(root, entry.path.rstrip("/")), entry.path.endswith("/")))
    for path, is_folder in candidates:
        if not (os.path.isdir(path) if is_folder else os.path.isfile(path)):
            return path
    return None


def check_layout(spec, root):
    """Raise DatasetLayoutError for the first missing folder or file the dataset needs."""
    if not str(root).strip():
        raise DatasetLayoutError(
            f"{spec.name}: DATASET.ROOT is empty. Pass --root DIR (the folder that holds "
            f"{spec.folder}/), or create the data with:\n  {prepare_command(spec, 'DIR')}",
            "",
        )
    missing = first_missing(spec, root)
    if missing == spec.dataset_dir(root) and _is_dataset_folder(spec, root):
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(root)))
        raise DatasetLayoutError(
            f"{spec.name}: --root {root} is the dataset folder itself; DATASET.ROOT (--root) is the folder that "
            f"holds {spec.folder}/: pass --root {parent}",
            missing,
        )
    if missing is not None:
        raise layout_error(spec, root, missing)


def _is_dataset_folder(spec, root):
    """Whether root holds what its dataset folder should: a user passed that folder as root."""
    root_dir = os.path.abspath(os.path.expanduser(root))
    first = next(entry for entry in spec.entries if entry.required)
    return os.path.basename(root_dir) == spec.folder or os.path.exists(os.path.join(root_dir, first.path))


def require_file(spec, root, relpath, why):
    """Raise DatasetLayoutError unless the file exists; `why` says what needs it."""
    path = spec.path(root, relpath)
    if not os.path.isfile(path):
        raise layout_error(spec, root, path, f"{path} does not exist ({why}).")
    return path


def check_images_exist(spec, root, named_splits):
    """Raise DatasetLayoutError naming the first image file that a split lists but is missing."""
    for split, records in named_splits:
        missing = [record.impath for record in records if not os.path.isfile(record.impath)]
        if missing:
            raise layout_error(
                spec, root, missing[0],
                f"{len(missing)} of the {len(records)} {split} images are missing, the first is {missing[0]}. "
                "Images are incomplete or the split file does not match them.",
            )
