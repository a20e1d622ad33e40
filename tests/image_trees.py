"""Small image files written in the on-disk layouts of real datasets.

Each image is a flat colour derived from a key (by default its class folder) plus noise, so
images of one class look alike and a classifier has something to learn.
"""

import atexit
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

# CoOp's real split file for Caltech101 (100 classes; 4128/1649/2465 train/val/test): in the
# repository's tests/fixtures/, else in the shared fixtures folder of the development machine.
_CALTECH_SPLIT_CANDIDATES = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "split_zhou_Caltech101.json"),
    "/work/shared/fixtures/split_zhou_Caltech101.json",
)
CALTECH_SPLIT = next((path for path in _CALTECH_SPLIT_CANDIDATES if os.path.isfile(path)), None)


def _colour(key):
    digest = hashlib.sha256(key.encode()).digest()
    return np.array(list(digest[:3]), dtype=np.float32)


def write_images(root, relpaths, size=32, seed=0, key_of=os.path.dirname):
    """Write one small image per relative path under root; returns the absolute paths."""
    rng = np.random.default_rng(seed)
    written = []
    for relpath in relpaths:
        path = os.path.join(str(root), relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = _colour(key_of(relpath) or relpath) + rng.normal(0, 20, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


def write_class_folders(root, counts, pattern="image_{:04d}.jpg", seed=0):
    """Write `counts[folder]` images into root/folder/; returns the relative paths."""
    relpaths = [
        os.path.join(folder, pattern.format(index + 1))
        for folder, count in counts.items()
        for index in range(count)
    ]
    write_images(root, relpaths, seed=seed)
    return relpaths


# ---------------------------------------------------------------------------------------------
# Dataset trees in the CoOp layout (datasets/specs.py), with placeholder images.

_PLACEHOLDER_FILE = None


def placeholder_file():
    """Path of one tiny valid JPEG, written once per process."""
    global _PLACEHOLDER_FILE
    if _PLACEHOLDER_FILE is None:
        handle, path = tempfile.mkstemp(suffix=".jpg")
        os.close(handle)
        Image.new("RGB", (16, 16), (120, 60, 200)).save(path, format="JPEG")
        atexit.register(os.remove, path)
        _PLACEHOLDER_FILE = path
    return _PLACEHOLDER_FILE


def write_placeholders(root, relpaths):
    """The same tiny JPEG at every relative path under root; returns the absolute paths.

    Hard links make thousands of files in a fraction of a second (writing them can take
    seconds on a busy disk); a copy is made where linking is impossible.
    """
    source = placeholder_file()
    paths, folders = [], set()
    for relpath in relpaths:
        path = os.path.join(str(root), relpath)
        folder = os.path.dirname(path)
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)
            folders.add(folder)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        paths.append(path)
    return paths


# Images per class and split; uneven so that some classes have fewer images than the shots asked.
SPLIT_COUNTS = {"train": (6, 3, 5, 4, 7), "val": (4, 2, 5, 3, 1), "test": (3, 2, 4, 1, 2)}


def split_file_tree(root, folder, image_dir, split_name, classes, relpath_of, counts=SPLIT_COUNTS):
    """Write the images and split_zhou_<split_name>.json; returns {split: [(impath, label, classname)]}."""
    dataset_dir = os.path.join(str(root), folder)
    image_root = os.path.join(dataset_dir, image_dir)
    split, expected, serial = {}, {}, 0
    for name, per_class in counts.items():
        split[name], expected[name] = [], []
        for label, classname in enumerate(classes):
            for _ in range(per_class[label % len(per_class)]):
                serial += 1
                relpath = relpath_of(label, classname, name, serial)
                split[name].append([relpath, label, classname])
                expected[name].append((os.path.join(image_root, relpath), label, classname))
    write_placeholders(image_root, [entry[0] for entries in split.values() for entry in entries])
    with open(os.path.join(dataset_dir, f"split_zhou_{split_name}.json"), "w") as file:
        json.dump(split, file)
    return expected


def caltech101_tree(root, split_path=None):
    """Caltech101 with CoOp's real split file (100 classes, 4128/1649/2465 images)."""
    split_path = split_path or CALTECH_SPLIT
    if split_path is None:
        pytest.skip("CoOp's split_zhou_Caltech101.json is not in tests/fixtures/")
    dataset_dir = os.path.join(str(root), "caltech-101")
    image_root = os.path.join(dataset_dir, "101_ObjectCategories")
    with open(split_path) as file:
        split = json.load(file)
    write_placeholders(image_root, [entry[0] for entries in split.values() for entry in entries])
    shutil.copy(split_path, os.path.join(dataset_dir, "split_zhou_Caltech101.json"))
    return {name: [(os.path.join(image_root, p), y, c) for p, y, c in entries] for name, entries in split.items()}


def oxford_pets_tree(root):
    breeds = ["abyssinian", "american_bulldog", "basset_hound", "beagle", "bengal"]

    def relpath(label, breed, split, serial):
        return f"{breed.capitalize() if label % 2 == 0 else breed}_{serial}.jpg"

    return split_file_tree(root, "oxford_pets", "images", "OxfordPets", breeds, relpath)


def stanford_cars_tree(root):
    cars = ["2012 Tesla Model S", "2012 BMW M3 coupe", "2007 Volvo 240 Sedan", "1993 Volvo 240 Sedan", "2012 Audi R8"]

    def relpath(label, car, split, serial):
        return f"{'cars_test' if split == 'test' else 'cars_train'}/{serial:05d}.jpg"

    return split_file_tree(root, "stanford_cars", "", "StanfordCars", cars, relpath)


def oxford_flowers_tree(root):
    flowers = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold"]
    return split_file_tree(
        root, "oxford_flowers", "jpg", "OxfordFlowers", flowers, lambda label, name, split, serial: f"image_{serial:05d}.jpg"
    )


def _class_folder_relpath(label, classname, split, serial):
    return f"{classname.replace(' ', '_')}/{serial:07d}.jpg"


def food101_tree(root):
    foods = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare"]
    return split_file_tree(root, "food-101", "images", "Food101", foods, _class_folder_relpath)


def sun397_tree(root):
    scenes = {"abbey": "a/abbey", "outdoor apartment_building": "a/apartment_building/outdoor", "bedroom": "b/bedroom",
              "indoor bowling": "b/bowling/indoor", "cathedral": "c/cathedral"}
    names = list(scenes)

    def relpath(label, classname, split, serial):
        return f"{scenes[classname]}/sun_{serial:06d}.jpg"

    return split_file_tree(root, "sun397", "SUN397", "SUN397", names, relpath)


def dtd_tree(root):
    textures = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
    return split_file_tree(root, "dtd", "images", "DescribableTextures", textures, _class_folder_relpath)


def eurosat_tree(root):
    folders = {"Annual Crop Land": "AnnualCrop", "Forest": "Forest", "Herbaceous Vegetation Land": "HerbaceousVegetation",
               "Highway or Road": "Highway", "Industrial Buildings": "Industrial"}

    def relpath(label, classname, split, serial):
        return f"{folders[classname]}/{folders[classname]}_{serial}.jpg"

    return split_file_tree(root, "eurosat", "2750", "EuroSAT", list(folders), relpath)


def ucf101_tree(root):
    actions = ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling", "Balance_Beam"]

    def relpath(label, action, split, serial):
        return f"{action}/v_{action.replace('_', '')}_g{serial:02d}_c01.jpg"

    return split_file_tree(root, "ucf101", "UCF-101-midframes", "UCF101", actions, relpath)


def synthetic_shapes_tree(root):
    from datasets.synthetic import generate

    generate(str(root))
    with open(os.path.join(str(root), "synthetic_shapes", "split_zhou_SyntheticShapes.json")) as file:
        split = json.load(file)
    image_root = os.path.join(str(root), "synthetic_shapes", "images")
    return {name: [(os.path.join(image_root, p), y, c) for p, y, c in entries] for name, entries in split.items()}


def fgvc_aircraft_tree(root):
    """FGVC-Aircraft's own lists: variants.txt gives labels by line order."""
    variants = ["707-320", "727-200", "A300B4", "BAE 146-200", "Cessna 172"]
    dataset_dir = os.path.join(str(root), "fgvc_aircraft")
    os.makedirs(dataset_dir, exist_ok=True)
    with open(os.path.join(dataset_dir, "variants.txt"), "w") as file:
        file.write("".join(f"{name}\n" for name in variants))
    expected, serial = {}, 1000000
    for split, per_class in SPLIT_COUNTS.items():
        lines, expected[split] = [], []
        # Lists are sorted by image id, not by class, as in the real files.
        for label, name in enumerate(variants):
            for _ in range(per_class[label]):
                serial += 7
                lines.append((f"{serial:07d}", label, name))
        lines.sort(key=lambda line: line[0][::-1])
        with open(os.path.join(dataset_dir, f"images_variant_{split}.txt"), "w") as file:
            file.write("".join(f"{image_id} {name}\n" for image_id, _, name in lines))
        paths = write_placeholders(os.path.join(dataset_dir, "images"), [f"{image_id}.jpg" for image_id, _, _ in lines])
        expected[split] = [(path, label, name) for path, (_, label, name) in zip(paths, lines, strict=False)]
    return expected


IMAGENET_CLASSES = [
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray"),
    ("n01498041", "stingray"), ("n01514668", "rooster"),
]


def write_classnames(path, classes=IMAGENET_CLASSES):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.write("".join(f"{folder} {name}\n" for folder, name in classes))


def _class_folder_images(image_root, folders_and_counts, label_of, name_of, pattern="{folder}_{index}.JPEG"):
    expected = []
    for folder, count in folders_and_counts:
        relpaths = [os.path.join(folder, pattern.format(folder=folder, index=index)) for index in range(count)]
        for path in write_placeholders(image_root, relpaths):
            expected.append((path, label_of[folder], name_of[folder]))
    return expected


def imagenet_tree(root, classes=IMAGENET_CLASSES[:5]):
    """ImageNet: images/train|val/<wnid>/ labelled by sorted folder, named by classnames.txt."""
    dataset_dir = os.path.join(str(root), "imagenet")
    write_classnames(os.path.join(dataset_dir, "classnames.txt"), classes)
    folders = sorted(folder for folder, _ in classes)
    label_of = {folder: label for label, folder in enumerate(folders)}
    name_of = dict(classes)
    expected = {}
    for split, folder_name in (("train", "train"), ("test", "val")):
        counts = SPLIT_COUNTS["train" if split == "train" else "val"]
        expected[split] = _class_folder_images(
            os.path.join(dataset_dir, "images", folder_name),
            [(folder, counts[label]) for label, folder in enumerate(folders)], label_of, name_of,
        )
    return expected


def imagenetv2_tree(root, classes=IMAGENET_CLASSES[:5]):
    """ImageNetV2: folder <i> holds the class on line i of classnames.txt."""
    dataset_dir = os.path.join(str(root), "imagenetv2")
    write_classnames(os.path.join(dataset_dir, "classnames.txt"), classes)
    image_root = os.path.join(dataset_dir, "imagenetv2-matched-frequency-format-val")
    counts = SPLIT_COUNTS["test"]
    expected = []
    for label, (_, name) in enumerate(classes):
        relpaths = [f"{label}/{index:040x}.jpeg" for index in range(counts[label % len(counts)])]
        expected.extend((path, label, name) for path in write_placeholders(image_root, relpaths))
    return {"test": expected}


def _imagenet_subset_tree(root, folder, image_dir, class_indices, readme=True):
    """ImageNet-Sketch/-A/-R: some classes, relabelled 0..n-1 in sorted folder order."""
    dataset_dir = os.path.join(str(root), folder)
    write_classnames(os.path.join(dataset_dir, "classnames.txt"))  # all classes, as in the real copy
    image_root = os.path.join(dataset_dir, image_dir)
    chosen = [IMAGENET_CLASSES[index] for index in class_indices]
    folders = sorted(wnid for wnid, _ in chosen)
    label_of = {wnid: label for label, wnid in enumerate(folders)}
    counts = SPLIT_COUNTS["test"]
    expected = _class_folder_images(
        image_root, [(wnid, counts[label % len(counts)]) for label, wnid in enumerate(folders)], label_of, dict(chosen)
    )
    if readme:  # shipped inside imagenet-a/ and imagenet-r/
        with open(os.path.join(image_root, "README.txt"), "w") as file:
            file.write("not a class\n")
    return {"test": expected}


def imagenet_sketch_tree(root):
    return _imagenet_subset_tree(root, "imagenet-sketch", "images", range(len(IMAGENET_CLASSES)), readme=False)


def imagenet_a_tree(root):
    return _imagenet_subset_tree(root, "imagenet-adversarial", "imagenet-a", (7, 1, 4, 6, 2))


def imagenet_r_tree(root):
    return _imagenet_subset_tree(root, "imagenet-rendition", "imagenet-r", (0, 3, 5, 2, 7))


# Dassl dataset name -> writer(root) returning {split: [(impath, label, classname)]}.
DATASET_TREES = {
    "ImageNet": imagenet_tree,
    "Caltech101": caltech101_tree,
    "OxfordPets": oxford_pets_tree,
    "StanfordCars": stanford_cars_tree,
    "OxfordFlowers": oxford_flowers_tree,
    "Food101": food101_tree,
    "FGVCAircraft": fgvc_aircraft_tree,
    "SUN397": sun397_tree,
    "DescribableTextures": dtd_tree,
    "EuroSAT": eurosat_tree,
    "UCF101": ucf101_tree,
    "ImageNetV2": imagenetv2_tree,
    "ImageNetSketch": imagenet_sketch_tree,
    "ImageNetA": imagenet_a_tree,
    "ImageNetR": imagenet_r_tree,
    "SyntheticShapes": synthetic_shapes_tree,
}
