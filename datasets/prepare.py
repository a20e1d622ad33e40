"""`python -m datasets.prepare NAME --root DIR [--check]`: fetch a dataset and check its layout.

Downloads what has a public address (CoOp's split files and classnames.txt from Google Drive
with gdown, image archives from their publishers) and prints what must be fetched by hand
(ImageNet needs a login, Stanford Cars is off-line at its source). Then it checks the CoOp
layout and reports, per split, how many images the split lists and how many are on disk.
With --check nothing is downloaded. Exit status: 0 when the dataset is complete, 1 when
something is missing, 2 for a bad command line.
"""

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass

from datasets import loading, readers
from datasets.errors import DatasetError
from datasets.layout import first_missing, layout_error
from datasets.specs import FGVC_LISTS, IMAGENET, SPECS, SPLIT_FILE, get_spec

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60


def gdrive_url(file_id):
    return f"https://drive.google.com/file/d/{file_id}/view"


def fetch(source, destination):
    """Download a URL or 'gdrive:<id>' to destination (through a partial file)."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = destination + ".partial"
    if source.startswith("gdrive:"):
        import gdown  # only needed for Google Drive files

        gdown.download(id=source[len("gdrive:"):], output=partial, quiet=False)
    else:
        with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as file:
            shutil.copyfileobj(response, file, length=1 << 20)
    if not os.path.isfile(partial) or os.path.getsize(partial) == 0:
        raise OSError(f"nothing was downloaded from {source}")
    if destination.endswith(".json"):
        # Google Drive answers some failures (quota, permissions) with an HTML page.
        try:
            with open(partial, encoding="utf-8") as file:
                json.load(file)
        except ValueError:
            os.remove(partial)
            raise OSError(f"{source} did not return JSON (Google Drive quota or permission page?)") from None
    os.replace(partial, destination)


def unpack(archive, into):
    """Unpack a zip/tar archive into a folder and delete the archive."""
    options = {}
    if not archive.endswith(".zip") and "filter" in inspect.signature(shutil.unpack_archive).parameters:
        options["filter"] = "data"  # refuse tar members outside `into` (Python >= 3.11.4); zip never writes outside
    shutil.unpack_archive(archive, into, **options)
    os.remove(archive)


@dataclass(frozen=True)
class Download:
    source: str  # https URL or "gdrive:<id>"
    to: str  # relative to the root

    def run(self, root):
        logger.info("Downloading %s", self.source)
        fetch(self.source, os.path.join(root, self.to))

    def by_hand(self):
        source = gdrive_url(self.source[len("gdrive:"):]) if self.source.startswith("gdrive:") else self.source
        return f"download {source} to {self.to}"


@dataclass(frozen=True)
class Unpack:
    archive: str  # relative to the root
    into: str  # relative to the root

    def run(self, root):
        logger.info("Unpacking %s", self.archive)
        unpack(os.path.join(root, self.archive), os.path.join(root, self.into))

    def by_hand(self):
        return f"unpack {self.archive} into {self.into or '.'}/"


@dataclass(frozen=True)
class Place:
    """Put a file or folder at `to`: moved there, or copied when `copy` (the source stays)."""

    source: str  # relative to the root
    to: str
    copy: bool = False

    def run(self, root):
        source, target = os.path.join(root, self.source), os.path.join(root, self.to)
        if self.copy:
            shutil.copyfile(source, target)
        else:
            os.replace(source, target)

    def by_hand(self):
        return f"{'copy' if self.copy else 'move'} {self.source} to {self.to}"


@dataclass(frozen=True)
class Generate:
    """The synthetic dataset is drawn, not downloaded."""

    def run(self, root):
        from datasets.synthetic import generate

        generate(root)

    def by_hand(self):
        return "run python -m datasets.synthetic --root <root>"


@dataclass(frozen=True)
class Task:
    """Steps that create `produces` (relative to the root); skipped when it exists."""

    produces: str
    steps: tuple = ()
    manual: str = ""  # instructions when there are no steps or they fail

    def instructions(self):
        automatic = "; then ".join(step.by_hand() for step in self.steps)
        return " ".join(part for part in (automatic, self.manual) if part)


def _split_file_task(name):
    spec = SPECS[name]
    return Task(f"{spec.folder}/{spec.split_file}", (Download(f"gdrive:{_SPLIT_FILE_IDS[name]}", f"{spec.folder}/{spec.split_file}"),))


def _archive_task(produces, url, archive, into, *more_steps):
    return Task(produces, (Download(url, archive), Unpack(archive, into), *more_steps))


def _classnames_tasks(folder):
    """Variants use ImageNet's classnames.txt: copy it, or download it when ImageNet is absent."""
    target = f"{folder}/classnames.txt"
    return (
        Task(target, (Place("imagenet/classnames.txt", target, copy=True),)),
        Task(target, (Download(f"gdrive:{_IMAGENET_CLASSNAMES_ID}", target),)),
    )


# Google Drive ids of CoOp's files, from CoOp's DATASETS.md.
_SPLIT_FILE_IDS = {
    "Caltech101": "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN",
    "OxfordPets": "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs",
    "StanfordCars": "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT",
    "OxfordFlowers": "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT",
    "Food101": "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
    "SUN397": "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq",
    "DescribableTextures": "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x",
    "EuroSAT": "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o",
    "UCF101": "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y",
}
_IMAGENET_CLASSNAMES_ID = "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"
_FLOWERS_CAT_TO_NAME_ID = "1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"
_UCF101_MIDFRAMES_ID = "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"
_OXFORD_VGG = "https://www.robots.ox.ac.uk/~vgg/data"

TASKS = {
    "ImageNet": (
        Task("imagenet/images/train", manual=(
            "ImageNet needs an account at https://image-net.org: download ILSVRC2012_img_train.tar and unpack "
            "it (and the 1,000 per-class tars inside) so that each class is a folder imagenet/images/train/n*/."
        )),
        Task("imagenet/images/val", manual=(
            "Download ILSVRC2012_img_val.tar from https://image-net.org and sort the 50,000 images into the "
            "same 1,000 class folders under imagenet/images/val/ (any ImageNet val-to-folders script)."
        )),
        Task("imagenet/classnames.txt", (Download(f"gdrive:{_IMAGENET_CLASSNAMES_ID}", "imagenet/classnames.txt"),)),
    ),
    "Caltech101": (
        _archive_task(
            "caltech-101/101_ObjectCategories", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
            "caltech-101.zip", "", Unpack("caltech-101/101_ObjectCategories.tar.gz", "caltech-101"),
        ),
        _split_file_task("Caltech101"),
    ),
    "OxfordPets": (
        _archive_task("oxford_pets/images", f"{_OXFORD_VGG}/pets/data/images.tar.gz", "oxford_pets/images.tar.gz", "oxford_pets"),
        _archive_task(
            "oxford_pets/annotations", f"{_OXFORD_VGG}/pets/data/annotations.tar.gz",
            "oxford_pets/annotations.tar.gz", "oxford_pets",
        ),
        _split_file_task("OxfordPets"),
    ),
    "StanfordCars": (
        Task("stanford_cars/cars_train", manual=(
            "Stanford no longer serves the dataset: from a copy of it (e.g. a Kaggle mirror of "
            "'Stanford Cars') put the folders cars_train/ and cars_test/ into stanford_cars/."
        )),
        Task("stanford_cars/cars_test", manual="Put the cars_test/ folder of the Stanford Cars dataset into stanford_cars/."),
        _split_file_task("StanfordCars"),
    ),
    "OxfordFlowers": (
        _archive_task("oxford_flowers/jpg", f"{_OXFORD_VGG}/flowers/102/102flowers.tgz", "oxford_flowers/102flowers.tgz", "oxford_flowers"),
        Task("oxford_flowers/imagelabels.mat", (Download(f"{_OXFORD_VGG}/flowers/102/imagelabels.mat", "oxford_flowers/imagelabels.mat"),)),
        Task("oxford_flowers/cat_to_name.json", (Download(f"gdrive:{_FLOWERS_CAT_TO_NAME_ID}", "oxford_flowers/cat_to_name.json"),)),
        _split_file_task("OxfordFlowers"),
    ),
    "Food101": (
        _archive_task("food-101/images", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "food-101.tar.gz", ""),
        _split_file_task("Food101"),
    ),
    "FGVCAircraft": (
        _archive_task(
            "fgvc_aircraft", f"{_OXFORD_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
            "fgvc-aircraft-2013b.tar.gz", "", Place("fgvc-aircraft-2013b/data", "fgvc_aircraft"),
        ),
    ),
    "SUN397": (
        _archive_task("sun397/SUN397", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "sun397/SUN397.tar.gz", "sun397"),
        _split_file_task("SUN397"),
    ),
    "DescribableTextures": (
        _archive_task("dtd/images", f"{_OXFORD_VGG}/dtd/download/dtd-r1.0.1.tar.gz", "dtd-r1.0.1.tar.gz", ""),
        _split_file_task("DescribableTextures"),
    ),
    "EuroSAT": (
        _archive_task(
            "eurosat/2750",
            "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
            "eurosat/EuroSAT.zip", "eurosat",
        ),
        _split_file_task("EuroSAT"),
    ),
    "UCF101": (
        _archive_task("ucf101/UCF-101-midframes", f"gdrive:{_UCF101_MIDFRAMES_ID}", "ucf101/UCF-101-midframes.zip", "ucf101"),
        _split_file_task("UCF101"),
    ),
    "ImageNetV2": (
        _archive_task(
            "imagenetv2/imagenetv2-matched-frequency-format-val",
            "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
            "imagenetv2/imagenetv2-matched-frequency.tar.gz", "imagenetv2",
        ),
        *_classnames_tasks("imagenetv2"),
    ),
    "ImageNetSketch": (
        Task("imagenet-sketch/images", manual=(
            "Download ImageNet-Sketch.zip (links at https://github.com/HaohanWang/ImageNet-Sketch), unzip it and "
            "rename the folder holding the 1,000 n* class folders to imagenet-sketch/images/."
        )),
        *_classnames_tasks("imagenet-sketch"),
    ),
    "ImageNetA": (
        _archive_task(
            "imagenet-adversarial/imagenet-a", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
            "imagenet-adversarial/imagenet-a.tar", "imagenet-adversarial",
        ),
        *_classnames_tasks("imagenet-adversarial"),
    ),
    "ImageNetR": (
        _archive_task(
            "imagenet-rendition/imagenet-r", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
            "imagenet-rendition/imagenet-r.tar", "imagenet-rendition",
        ),
        *_classnames_tasks("imagenet-rendition"),
    ),
    "ObjectNet": (
        # The archive is password-protected (the password is published with the download), which
        # shutil cannot unpack, so it is fetched and unzipped by hand.
        Task("objectnet/objectnet-1.0", manual=(
            "download https://objectnet.dev/downloads/objectnet-1.0.zip and unzip it (with the password given "
            "on objectnet.dev) inside objectnet/, giving objectnet/objectnet-1.0/images/ and "
            "objectnet/objectnet-1.0/mappings/."
        )),
        *_classnames_tasks("objectnet"),
    ),
    "SyntheticShapes": (
        Task("synthetic_shapes/images", (Generate(),)),
        Task("synthetic_shapes/split_zhou_SyntheticShapes.json", (Generate(),)),
    ),
}


def fetch_missing(spec, root):
    """Run the tasks whose target is missing; returns [(target, instructions)] still missing."""
    for task in TASKS[spec.name]:
        if os.path.exists(os.path.join(root, task.produces)) or not task.steps:
            continue
        try:
            for step in task.steps:
                step.run(root)
        except Exception as error:  # any failure (network, disk, bad archive) means "fetch it by hand"
            logger.warning("Could not fetch %s: %s: %s", task.produces, type(error).__name__, error)
        else:
            logger.info("Fetched %s", task.produces)
    still_missing = {}
    for task in TASKS[spec.name]:
        if not os.path.exists(os.path.join(root, task.produces)):
            still_missing.setdefault(task.produces, []).append(task.instructions())
    return [(target, "; or ".join(hints)) for target, hints in still_missing.items()]


def split_inventory(spec, root):
    """[(split, images listed, images found, first missing path or None)]."""
    if spec.kind in (SPLIT_FILE, FGVC_LISTS):
        splits = zip(readers.SPLIT_NAMES, loading.read_full_splits(spec, root), strict=False)
    elif spec.kind == IMAGENET:
        splits = loading.list_imagenet(spec, root).items()
    else:
        splits = [("test", loading.read_variant(spec, root)[0])]
    inventory = []
    for split, records in splits:
        missing = [record.impath for record in records if not os.path.isfile(record.impath)]
        inventory.append((split, len(records), len(records) - len(missing), missing[0] if missing else None))
    return inventory


def report(spec, root):
    """Print the layout check and per-split counts; True when nothing is missing."""
    missing = first_missing(spec, root)
    if missing is not None:
        print(layout_error(spec, root, missing), file=sys.stderr)
        return False
    try:
        inventory = split_inventory(spec, root)
    except DatasetError as error:
        print(error, file=sys.stderr)
        return False
    published = dict(spec.expected_sizes)
    print(f"{spec.name} in {spec.dataset_dir(root)}:")
    for split, listed, found, first in inventory:
        line = f"  {split}: {listed} images listed, {found} found, {listed - found} missing (published: {published.get(split, '?')})"
        print(line + (f"; first missing: {first}" if first else ""))
    complete = all(first is None for *_, first in inventory)
    print("Complete." if complete else "Incomplete: restore the missing images (or re-download the archives).")
    return complete


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fetch a CoOp benchmark dataset into its CoOp layout and check it.")
    parser.add_argument("name", help=f"config stem or Dassl name, one of: {', '.join(s.stem for s in SPECS.values())}")
    parser.add_argument("--root", required=True, help="DATASET.ROOT: the folder that holds one folder per dataset")
    parser.add_argument("--check", action="store_true", help="only check the layout and count the images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = get_spec(args.name)
    except DatasetError as error:
        print(error, file=sys.stderr)
        return 2
    root = os.path.abspath(os.path.expanduser(args.root))
    if not args.check:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as error:
            print(f"Cannot create the root folder {root}: {error}", file=sys.stderr)
            return 1
        by_hand = fetch_missing(spec, root)
        if by_hand:
            print(f"\n{len(by_hand)} item(s) could not be fetched automatically. Fetch them by hand (paths under {root}):")
            for target, instructions in by_hand:
                print(f"  - {target}: {instructions}")
            print()
    return 0 if report(spec, root) else 1


if __name__ == "__main__":
    sys.exit(main())
