"""What each dataset looks like on disk, in CoOp's layout (CoOp's DATASETS.md and datasets/*.py).

One `DatasetSpec` per Dassl dataset name. Folder names, image folders and split files are
CoOp's, so a `$DATA` folder prepared for CoOp, MaPLe or PromptSRC works unchanged.
"""

import os
from dataclasses import dataclass

from datasets.errors import DatasetConfigError

# How a dataset's splits are read (see datasets.readers).
SPLIT_FILE = "split_file"  # CoOp's split_zhou_<Name>.json: [[relpath, label, classname], ...]
FGVC_LISTS = "fgvc_lists"  # FGVC-Aircraft's own variants.txt + images_variant_<split>.txt
IMAGENET = "imagenet"  # class folders + classnames.txt, cached in preprocessed.pkl
VARIANT_BY_INDEX = "variant_by_index"  # test-only; folder <i> holds ImageNet class i (ImageNetV2)
VARIANT_BY_FOLDER = "variant_by_folder"  # test-only; sorted n* folders relabelled 0..n-1
OBJECTNET = "objectnet"  # test-only; the ObjectNet release with its mapping files to ImageNet

FEWSHOT_FOLDER = "split_fewshot"  # CoOp's few-shot caches, inside each dataset folder
OBJECTNET_MAPPINGS = "objectnet-1.0/mappings"  # the release's files relating its classes to ImageNet's


@dataclass(frozen=True)
class Entry:
    """A path inside the dataset folder; folders end with '/'."""

    path: str
    note: str
    required: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # Dassl dataset name (DATASET.NAME) = CoOp's class name
    stem: str  # configs/datasets/<stem>.yaml
    folder: str  # folder under DATASET.ROOT
    kind: str
    image_dir: str  # split-file paths and class folders are relative to this ("" = dataset folder)
    entries: tuple  # in the order a user creates them; the first missing one is reported
    expected_sizes: tuple  # ((split, number of images), ...) as published, for reports
    num_classes: int
    border: int = 0  # pixels to cut from every side of a test image before its transform


    @property
    def split_file(self):
        return f"split_zhou_{self.name}.json" if self.kind == SPLIT_FILE else None

    @property
    def test_only(self):
        return self.kind in (VARIANT_BY_INDEX, VARIANT_BY_FOLDER, OBJECTNET)

    def dataset_dir(self, root):
        return os.path.join(os.path.abspath(os.path.expanduser(root)), self.folder)

    def path(self, root, *parts):
        return os.path.join(self.dataset_dir(root), *parts)


def _split_file_spec(name, stem, folder, image_dir, sizes, num_classes, image_note, extras=()):
    return DatasetSpec(
        name=name,
        stem=stem,
        folder=folder,
        kind=SPLIT_FILE,
        image_dir=image_dir,
        entries=(
            *((Entry(f"{image_dir}/", image_note),) if image_dir else ()),
            *extras,
            Entry(f"split_zhou_{name}.json", "CoOp's fixed train/val/test split"),
        ),
        expected_sizes=tuple(zip(("train", "val", "test"), sizes, strict=False)),
        num_classes=num_classes,
    )


def _variant_spec(name, stem, folder, image_dir, kind, size, num_classes, image_note):
    return DatasetSpec(
        name=name,
        stem=stem,
        folder=folder,
        kind=kind,
        image_dir=image_dir,
        entries=(
            Entry(f"{image_dir}/", image_note),
            Entry("classnames.txt", "a copy of imagenet/classnames.txt"),
        ),
        expected_sizes=(("test", size),),
        num_classes=num_classes,
    )


_SPECS = (
    DatasetSpec(
        name="ImageNet",
        stem="imagenet",
        folder="imagenet",
        kind=IMAGENET,
        image_dir="images",
        entries=(
            Entry("images/train/", "1,000 class folders n01440764/ ... from ILSVRC2012_img_train.tar"),
            Entry("images/val/", "the 50,000 validation images sorted into the same 1,000 folders"),
            Entry("classnames.txt", "'<folder> <class name>' per line (needed to build preprocessed.pkl)", False),
            Entry("preprocessed.pkl", "written on first use", False),
        ),
        expected_sizes=(("train", 1281167), ("test", 50000)),
        num_classes=1000,
    ),
    _split_file_spec(
        "Caltech101", "caltech101", "caltech-101", "101_ObjectCategories", (4128, 1649, 2465), 100,
        "class folders from 101_ObjectCategories.tar.gz",
    ),
    _split_file_spec(
        "OxfordPets", "oxford_pets", "oxford_pets", "images", (2944, 736, 3669), 37,
        "all images from images.tar.gz",
        extras=(Entry("annotations/", "from annotations.tar.gz (only needed to rebuild the split)", False),),
    ),
    _split_file_spec(
        "StanfordCars", "stanford_cars", "stanford_cars", "", (6509, 1635, 8041), 196, "",
        extras=(
            Entry("cars_train/", "training images from cars_train.tgz"),
            Entry("cars_test/", "test images from cars_test.tgz"),
            Entry("devkit/", "from car_devkit.tgz (only needed to rebuild the split)", False),
            Entry("cars_test_annos_withlabels.mat", "(only needed to rebuild the split)", False),
        ),
    ),
    _split_file_spec(
        "OxfordFlowers", "oxford_flowers", "oxford_flowers", "jpg", (4093, 1633, 2463), 102,
        "image_00001.jpg ... from 102flowers.tgz",
        extras=(
            Entry("imagelabels.mat", "(only needed to rebuild the split)", False),
            Entry("cat_to_name.json", "(only needed to rebuild the split)", False),
        ),
    ),
    _split_file_spec(
        "Food101", "food101", "food-101", "images", (50500, 20200, 30300), 101,
        "class folders from food-101.tar.gz",
    ),
    DatasetSpec(
        name="FGVCAircraft",
        stem="fgvc_aircraft",
        folder="fgvc_aircraft",
        kind=FGVC_LISTS,
        image_dir="images",
        entries=(
            Entry("images/", "<id>.jpg files: the data/ folder of fgvc-aircraft-2013b.tar.gz is this folder"),
            Entry("variants.txt", "one class name per line; line order gives the labels"),
            Entry("images_variant_train.txt", "'<id> <class name>' per line"),
            Entry("images_variant_val.txt", "'<id> <class name>' per line"),
            Entry("images_variant_test.txt", "'<id> <class name>' per line"),
        ),
        expected_sizes=(("train", 3334), ("val", 3333), ("test", 3333)),
        num_classes=100,
    ),
    _split_file_spec(
        "SUN397", "sun397", "sun397", "SUN397", (15880, 3970, 19850), 397,
        "a/abbey/... from SUN397.tar.gz",
    ),
    _split_file_spec(
        "DescribableTextures", "dtd", "dtd", "images", (2820, 1128, 1692), 47,
        "class folders from dtd-r1.0.1.tar.gz",
    ),
    _split_file_spec(
        "EuroSAT", "eurosat", "eurosat", "2750", (13500, 5400, 8100), 10,
        "class folders from EuroSAT.zip (RGB)",
    ),
    _split_file_spec(
        "UCF101", "ucf101", "ucf101", "UCF-101-midframes", (7639, 1898, 3783), 101,
        "middle video frames from CoOp's UCF-101-midframes.zip",
    ),
    _variant_spec(
        "ImageNetV2", "imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
        VARIANT_BY_INDEX, 10000, 1000, "folders 0/ ... 999/, folder i holding ImageNet class i",
    ),
    _variant_spec(
        "ImageNetSketch", "imagenet_sketch", "imagenet-sketch", "images",
        VARIANT_BY_FOLDER, 50889, 1000, "1,000 class folders n01440764/ ...",
    ),
    _variant_spec(
        "ImageNetA", "imagenet_a", "imagenet-adversarial", "imagenet-a",
        VARIANT_BY_FOLDER, 7500, 200, "200 class folders n01498041/ ...",
    ),
    _variant_spec(
        "ImageNetR", "imagenet_r", "imagenet-rendition", "imagenet-r",
        VARIANT_BY_FOLDER, 30000, 200, "200 class folders n01443537/ ...",
    ),
    DatasetSpec(
        name="ObjectNet",
        stem="objectnet",
        folder="objectnet",
        kind=OBJECTNET,
        image_dir="objectnet-1.0/images",
        entries=(
            Entry("objectnet-1.0/images/", "313 class folders (air_freshener/ ...) from objectnet-1.0.zip"),
            Entry(f"{OBJECTNET_MAPPINGS}/folder_to_objectnet_label.json", "folder -> ObjectNet class name"),
            Entry(f"{OBJECTNET_MAPPINGS}/objectnet_to_imagenet_1k.json",
                  "ObjectNet class -> its ImageNet classes, '; '-separated (113 classes)"),
            Entry(f"{OBJECTNET_MAPPINGS}/pytorch_to_imagenet_2012_id.json", "ImageNet label -> line of the next file"),
            Entry(f"{OBJECTNET_MAPPINGS}/imagenet_to_label_2012_v2", "ImageNet class names, one a line"),
            Entry("classnames.txt", "a copy of imagenet/classnames.txt"),
        ),
        # The 113 classes shared with ImageNet, as the robustness literature evaluates ObjectNet.
        expected_sizes=(("test", 18574),),
        num_classes=113,
        border=2,  # the release frames every image in red; WiSE-FT and FLYP cut 2 pixels per side
    ),
    _split_file_spec(
        "SyntheticShapes", "synthetic_shapes", "synthetic_shapes", "images", (200, 80, 200), 10,
        "one folder per class (red_circle/, ...) written by python -m datasets.synthetic",
    ),
)

SPECS = {spec.name: spec for spec in _SPECS}


def get_spec(name):
    """The spec for a Dassl dataset name or a config stem (case-insensitive)."""
    wanted = name.strip().lower()
    for spec in _SPECS:
        if wanted in (spec.name.lower(), spec.stem):
            return spec
    known = ", ".join(f"{spec.name} ({spec.stem})" for spec in _SPECS)
    raise DatasetConfigError(f"Unknown dataset {name!r}. Known datasets (config stem): {known}.")
