"""Readers for the files and folders of the CoOp layout; each returns lists of `Record`.

Labels, class names and record order follow CoOp's datasets/*.py, because the order of
records within a label decides which images `random.sample` picks for a seed. Images of
one class folder are taken in directory order (`os.scandir`, like the `os.listdir` CoOp
uses), not sorted: sorting would pick different ImageNet few-shot images than CoOp does on
the same disk.
"""

import json
import os

from datasets.errors import DatasetFormatError, DatasetLayoutError
from datasets.records import Record

SPLIT_NAMES = ("train", "val", "test")


def read_split_file(path, image_dir):
    """(train, val, test) from a split_zhou_*.json; image paths are joined onto image_dir."""
    try:
        with open(path, encoding="utf-8") as file:
            split = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFormatError(
            f"{path} is not valid JSON ({error}). It may be a download error page; delete it and "
            "download it again with: python -m datasets.prepare NAME --root DIR."
        ) from None
    if not isinstance(split, dict) or any(not isinstance(split.get(name), list) for name in SPLIT_NAMES):
        raise DatasetFormatError(f"{path} must be a JSON object with the lists 'train', 'val' and 'test'.")
    return tuple(_split_records(path, name, split[name], image_dir) for name in SPLIT_NAMES)


def _split_records(path, split_name, entries, image_dir):
    records = []
    for index, entry in enumerate(entries):
        try:
            relpath, label, classname = entry
            records.append(Record(os.path.join(image_dir, relpath), int(label), 0, classname))
        except (TypeError, ValueError):
            raise DatasetFormatError(
                f"{path}: entry {index} of '{split_name}' is {entry!r}; expected [relative path, label, class name]."
            ) from None
    return records


def read_lines(path):
    """Stripped non-empty lines of a text file."""
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


def read_fgvc(dataset_dir, image_dir):
    """(train, val, test) from FGVC-Aircraft's variants.txt and images_variant_<split>.txt."""
    label_of = {name: label for label, name in enumerate(read_lines(os.path.join(dataset_dir, "variants.txt")))}
    splits = []
    for split_name in SPLIT_NAMES:
        list_path = os.path.join(dataset_dir, f"images_variant_{split_name}.txt")
        records = []
        for line in read_lines(list_path):
            image_id, _, classname = line.partition(" ")
            if classname not in label_of:
                raise DatasetFormatError(f"{list_path}: class {classname!r} of image {image_id} is not in variants.txt.")
            records.append(Record(os.path.join(image_dir, f"{image_id}.jpg"), label_of[classname], 0, classname))
        splits.append(records)
    return tuple(splits)


def read_imagenet_classnames(path):
    """{folder: class name} from lines '<folder> <class name>', in file order."""
    classnames = {}
    for line in read_lines(path):
        folder, _, classname = line.partition(" ")
        classnames[folder] = classname
    return classnames


def list_images(folder):
    """Names of the non-hidden files in folder, in directory order (see the module docstring)."""
    with os.scandir(folder) as entries:
        return [entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")]


def list_class_folders(folder):
    """Sorted names of the non-hidden sub-folders."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


def _class_name(classnames, folder, classnames_path):
    if folder not in classnames:
        raise DatasetFormatError(f"Class folder {folder} has no line in {classnames_path}.")
    return classnames[folder]


def read_class_folders(image_dir, classnames, classnames_path):
    """Records of sorted class folders labelled 0..n-1 (ImageNet, -Sketch, -A, -R)."""
    records = []
    for label, folder in enumerate(list_class_folders(image_dir)):
        classname = _class_name(classnames, folder, classnames_path)
        class_dir = os.path.join(image_dir, folder)
        records.extend(Record(os.path.join(class_dir, name), label, 0, classname) for name in list_images(class_dir))
    return records


def read_indexed_folders(image_dir, classnames, classnames_path):
    """Records of folders 0/, 1/, ... holding ImageNet class i in folder i (ImageNetV2)."""
    records = []
    for label, folder in enumerate(classnames):
        class_dir = os.path.join(image_dir, str(label))
        if not os.path.isdir(class_dir):
            raise DatasetLayoutError(
                f"{class_dir} does not exist: {image_dir} needs one folder per line of {classnames_path} "
                f"(0/ to {len(classnames) - 1}/).",
                class_dir,
            )
        classname = classnames[folder]
        records.extend(Record(os.path.join(class_dir, name), label, 0, classname) for name in list_images(class_dir))
    return records


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFormatError(f"{path} is not valid JSON ({error}); restore it from objectnet-1.0.zip.") from None


def read_objectnet(image_dir, mappings_dir):
    """(records, members): the images of the ObjectNet classes shared with ImageNet, and for each
    such class the ImageNet labels it covers.

    The release's mapping files chain as: image folder -> ObjectNet class name
    (folder_to_objectnet_label.json) -> names of its ImageNet classes, '; '-separated
    (objectnet_to_imagenet_1k.json) -> line numbers of those names in imagenet_to_label_2012_v2
    (ImageNet 2012 ids) -> ImageNet labels in the usual sorted-folder order, whose 2012 ids
    pytorch_to_imagenet_2012_id.json gives. Classes are the mapped folders in sorted order,
    labelled 0..n-1 and named by their ObjectNet class name in lower case, as in WiSE-FT; folders
    of the other ObjectNet classes are skipped.
    """
    folder_to_class = _read_json(os.path.join(mappings_dir, "folder_to_objectnet_label.json"))
    class_to_imagenet = _read_json(os.path.join(mappings_dir, "objectnet_to_imagenet_1k.json"))
    label_to_2012 = _read_json(os.path.join(mappings_dir, "pytorch_to_imagenet_2012_id.json"))
    names_path = os.path.join(mappings_dir, "imagenet_to_label_2012_v2")
    lines_of = {}
    for line_number, name in enumerate(read_lines(names_path)):
        lines_of.setdefault(name, []).append(line_number)
    label_of_2012 = {int(id_2012): int(label) for label, id_2012 in label_to_2012.items()}

    def imagenet_labels(objectnet_class):
        labels = []
        for name in class_to_imagenet[objectnet_class].split("; "):
            lines = lines_of.get(name.strip(), [])
            if len(lines) != 1:
                problem = "is not a line of" if not lines else "is on several lines of"
                raise DatasetFormatError(f"ImageNet class {name!r} of ObjectNet class {objectnet_class!r} {problem} {names_path}.")
            if lines[0] not in label_of_2012:
                raise DatasetFormatError(f"ImageNet 2012 id {lines[0]} ({name!r}) has no label in pytorch_to_imagenet_2012_id.json.")
            labels.append(label_of_2012[lines[0]])
        return sorted(labels)

    mapped = sorted(folder for folder, name in folder_to_class.items() if name in class_to_imagenet)
    unmatched = sorted(set(class_to_imagenet) - {folder_to_class[folder] for folder in mapped})
    if unmatched:
        raise DatasetFormatError(
            f"ObjectNet classes {', '.join(map(repr, unmatched))} of objectnet_to_imagenet_1k.json have no folder in "
            "folder_to_objectnet_label.json; the mapping files come from different releases."
        )
    records, members = [], []
    for label, folder in enumerate(mapped):
        class_dir = os.path.join(image_dir, folder)
        if not os.path.isdir(class_dir):
            raise DatasetLayoutError(f"{class_dir} does not exist: {image_dir} lacks the folder of ObjectNet class "
                                     f"{folder_to_class[folder]!r}. Unzip objectnet-1.0.zip again.", class_dir)
        classname = folder_to_class[folder].lower()
        records.extend(Record(os.path.join(class_dir, name), label, 0, classname) for name in list_images(class_dir))
        members.append(tuple(imagenet_labels(folder_to_class[folder])))
    return records, tuple(members)
