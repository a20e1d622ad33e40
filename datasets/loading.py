"""`load_dataset`: CoOp's dataset constructors without Dassl.

For a given root, name, NUM_SHOTS, SEED and SUBSAMPLE_CLASSES it returns the same samples,
labels and class names as CoOp/MaPLe, provided `random` was seeded with SEED (Dassl's
`set_random_seed`) and not used since, and it reads and writes the same cache files:

1. the full splits: the split file (split_zhou_<Name>.json), FGVC's lists, or ImageNet's
   preprocessed.pkl (built from the class folders when absent);
2. with NUM_SHOTS >= 1: split_fewshot/shot_<K>-seed_<SEED>.pkl, else K images per class of
   train and min(K, 4) of val sampled now (ImageNet: train only);
3. the base or new half of the classes, relabelled from 0.
"""

import logging
import os

from datasets import cache, readers
from datasets.errors import DatasetFormatError
from datasets.fewshot import check_subsample, group_by_label, sample_few_shot, subsample_classes
from datasets.layout import check_images_exist, check_layout, require_file
from datasets.records import ImageNetSubset, LoadedDataset
from datasets.specs import (
    FEWSHOT_FOLDER,
    FGVC_LISTS,
    IMAGENET,
    OBJECTNET,
    OBJECTNET_MAPPINGS,
    SPLIT_FILE,
    VARIANT_BY_INDEX,
    get_spec,
)

logger = logging.getLogger(__name__)


def fewshot_cache_path(dataset_dir, num_shots, seed):
    return os.path.join(dataset_dir, FEWSHOT_FOLDER, f"shot_{num_shots}-seed_{seed}.pkl")


def read_full_splits(spec, root):
    """(train, val, test) before few-shot sampling; val is None for ImageNet (CoOp has none).

    Test-only datasets have no such splits: use `read_variant`.
    """
    dataset_dir = spec.dataset_dir(root)
    image_dir = spec.path(root, spec.image_dir)
    if spec.kind == SPLIT_FILE:
        return readers.read_split_file(spec.path(root, spec.split_file), image_dir)
    if spec.kind == FGVC_LISTS:
        return readers.read_fgvc(dataset_dir, image_dir)
    if spec.kind == IMAGENET:
        splits = cache.load_or_build(
            spec.path(root, "preprocessed.pkl"), ("train", "test"), dataset_dir, lambda: list_imagenet(spec, root)
        )
        return splits["train"], None, splits["test"]
    raise ValueError(f"{spec.name} is test-only; read it with read_variant")


def list_imagenet(spec, root):
    """{"train": records of images/train, "test": records of images/val}, labels by sorted folder."""
    classnames_path = require_file(spec, root, "classnames.txt", "it names the classes when preprocessed.pkl is built")
    classnames = readers.read_imagenet_classnames(classnames_path)
    logger.info("Listing the ImageNet class folders (once; the result goes to preprocessed.pkl)")
    return {
        split: readers.read_class_folders(spec.path(root, "images", folder), classnames, classnames_path)
        for split, folder in (("train", "train"), ("test", "val"))
    }


def read_variant(spec, root):
    """(test images, ImageNetSubset or None) of a test-only ImageNet variant. The subset says how
    its classes sit among ImageNet's; None when it has all of them (ImageNetV2, ImageNet-Sketch).

    ImageNet's classes are those of the variant's classnames.txt (a copy of ImageNet's), labelled in
    sorted folder order as ImageNet is; ImageNet-A/-R classes are their folders, ObjectNet's come
    from its mapping files.
    """
    classnames_path = spec.path(root, "classnames.txt")
    classnames = readers.read_imagenet_classnames(classnames_path)
    wnids = sorted(classnames)
    image_dir = spec.path(root, spec.image_dir)
    if spec.kind == VARIANT_BY_INDEX:
        return readers.read_indexed_folders(image_dir, classnames, classnames_path), None
    if spec.kind == OBJECTNET:
        records, members = readers.read_objectnet(image_dir, spec.path(root, OBJECTNET_MAPPINGS))
        highest = max(max(labels) for labels in members)
        if highest >= len(wnids):
            raise DatasetFormatError(
                f"ObjectNet's mapping files use ImageNet label {highest}, but {classnames_path} names only "
                f"{len(wnids)} classes: it must be a copy of imagenet/classnames.txt (1,000 lines)."
            )
    else:
        records = readers.read_class_folders(image_dir, classnames, classnames_path)
        folders = readers.list_class_folders(image_dir)
        if len(folders) == len(wnids):
            return records, None
        label_of = {wnid: label for label, wnid in enumerate(wnids)}
        members = tuple((label_of[folder],) for folder in folders)  # read_class_folders checked every folder
    return records, ImageNetSubset(tuple(classnames[wnid] for wnid in wnids), members)


def load_dataset(name, root, num_shots=-1, seed=-1, subsample="all"):
    """Load a dataset as CoOp does (see the module docstring).

    name: Dassl name or config stem. Few-shot sampling draws from the `random` module, which
    the caller seeds with `seed` (as train.py does) to get CoOp's samples. Every returned
    image is stat'ed, so a missing one fails here with its path, not in a loader worker.
    Raises DatasetLayoutError, DatasetFormatError or DatasetConfigError.
    """
    spec = get_spec(name)
    check_subsample(subsample)
    check_layout(spec, root)

    if spec.test_only:
        if num_shots >= 1 or subsample != "all":
            # CoOp's variant classes ignore both options; so do we, visibly.
            logger.info("%s is test-only: NUM_SHOTS and SUBSAMPLE_CLASSES are ignored.", spec.name)
        test, imagenet_subset = read_variant(spec, root)
        loaded = LoadedDataset(train_x=test, val=[], test=test, imagenet_subset=imagenet_subset)
    else:
        train, val, test = read_full_splits(spec, root)
        if num_shots >= 1:
            train, val = _few_shot(spec, root, train, val, num_shots, seed)
        if val is None:
            # ImageNet: CoOp evaluates on the official val set and passes it as val and test.
            train, test = subsample_classes(train, test, subsample=subsample)
            val = test
        else:
            train, val, test = subsample_classes(train, val, test, subsample=subsample)
        loaded = LoadedDataset(train_x=train, val=val, test=test)

    distinct = {}  # test-only datasets and ImageNet use one list twice; stat it once
    for split, records in (("test", loaded.test), ("val", loaded.val), ("train", loaded.train_x)):
        distinct.setdefault(id(records), (split, records))
    check_images_exist(spec, root, distinct.values())
    return loaded


def _few_shot(spec, root, train, val, num_shots, seed):
    sizes = [len(items) for items in group_by_label(train).values()]
    short = [size for size in sizes if size < num_shots]
    if short:
        logger.warning(
            "DATASET.NUM_SHOTS is %d but %d of the %d classes of %s have fewer training images (the smallest %d): "
            "those keep all of theirs.", num_shots, len(short), len(sizes), spec.name, min(short),
        )
    keys = ("train",) if val is None else ("train", "val")

    def sample():
        logger.info("Sampling %d-shot %s with seed %s", num_shots, spec.name, seed)
        sampled = {"train": sample_few_shot(train, num_shots)}
        if val is not None:
            sampled["val"] = sample_few_shot(val, min(num_shots, 4))
        return sampled

    path = fewshot_cache_path(spec.dataset_dir(root), num_shots, seed)
    splits = cache.load_or_build(path, keys, spec.dataset_dir(root), sample)
    return splits["train"], splits.get("val")
