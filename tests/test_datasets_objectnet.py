"""ObjectNet in the layout of its release (objectnet-1.0/images + objectnet-1.0/mappings), and the
ImageNet classes that ImageNet-A/-R and ObjectNet cover."""

import json
import os
import random

import pytest

from datasets import DatasetFormatError, DatasetLayoutError, get_spec, load_dataset
from datasets.prepare import main as prepare_main
from tests.conftest import requires_dassl
from tests.image_trees import imagenet_a_tree, imagenet_sketch_tree, write_images
from tests.train_harness import TrainRun

# Entries of the release's mapping files (name, 2012 id = line of imagenet_to_label_2012_v2, and the
# ImageNet label in sorted-folder order that pytorch_to_imagenet_2012_id.json gives that id).
REAL_IMAGENET = {
    "analog clock": (426, 409), "digital clock": (427, 530), "banana": (230, 954),
    "barber chair": (214, 423), "folding chair": (216, 559), "rocking chair, rocker": (217, 765),
}
REAL_CLASSES = {  # folder: (ObjectNet class, its ImageNet classes as the release writes them)
    "alarm_clock": ("Alarm clock", "analog clock; digital clock"),
    "banana": ("Banana", "banana"),
    "chair": ("Chair", "barber chair; folding chair; rocking chair, rocker"),
}
UNMAPPED = {"squeegee": "Squeegee", "eyeglasses": "Eyeglasses", "coaster": "Coaster"}
NUM_IMAGENET = 1000
NUM_SHARED = 113


def write_json(path, data):
    with open(path, "w") as file:
        json.dump(data, file, indent=2)


def objectnet_tree(root, images_per_class=1):
    """The ObjectNet release with the 113 shared classes (3 of them real, 110 made up), 3 classes
    ImageNet lacks, and an ImageNet of 1000 classes whose 2012 ids are a permutation of its labels.

    Returns {folder: (label, class name, ImageNet labels)} of the shared classes.
    """
    dataset_dir = os.path.join(str(root), "objectnet")
    mappings = os.path.join(dataset_dir, "objectnet-1.0", "mappings")
    os.makedirs(mappings)
    rng = random.Random(0)
    fixed = dict(REAL_IMAGENET.values())  # 2012 id -> label
    free_ids = [i for i in range(NUM_IMAGENET) if i not in fixed]
    free_labels = [label for label in range(NUM_IMAGENET) if label not in fixed.values()]
    rng.shuffle(free_labels)
    label_of_id = {**fixed, **dict(zip(free_ids, free_labels, strict=False))}
    name_of_id = {id_2012: f"imagenet class {label_of_id[id_2012]}" for id_2012 in range(NUM_IMAGENET)}
    name_of_id.update({id_2012: name for name, (id_2012, _) in REAL_IMAGENET.items()})
    with open(os.path.join(mappings, "imagenet_to_label_2012_v2"), "w") as file:
        file.write("".join(f"{name_of_id[i]}\n" for i in range(NUM_IMAGENET)))
    write_json(os.path.join(mappings, "pytorch_to_imagenet_2012_id.json"),
               {str(label): id_2012 for id_2012, label in sorted(label_of_id.items(), key=lambda item: item[1])})

    classes = dict(REAL_CLASSES)
    for index in range(NUM_SHARED - len(REAL_CLASSES)):  # made up: one or two ImageNet classes each
        labels = [free_labels[2 * index]] + ([free_labels[2 * index + 1]] if index % 3 == 0 else [])
        classes[f"thing_{index:03d}"] = (f"Thing {index}", "; ".join(f"imagenet class {label}" for label in labels))
    write_json(os.path.join(mappings, "objectnet_to_imagenet_1k.json"), {name: imagenet for name, imagenet in classes.values()})
    folder_names = {folder: name for folder, (name, _) in classes.items()}
    write_json(os.path.join(mappings, "folder_to_objectnet_label.json"), {**folder_names, **UNMAPPED})

    image_dir = os.path.join(dataset_dir, "objectnet-1.0", "images")
    folders = list(classes) + list(UNMAPPED)
    write_images(image_dir, [f"{folder}/{index:040x}.png" for folder in folders for index in range(images_per_class)])
    with open(os.path.join(dataset_dir, "classnames.txt"), "w") as file:  # ImageNet's, in its own (wnid) order
        file.write("".join(f"n{label:08d} imagenet class {label}\n" for label in rng.sample(range(NUM_IMAGENET), NUM_IMAGENET)))

    imagenet_of = {name: label for name, (_, label) in REAL_IMAGENET.items()}
    expected = {}
    for label, folder in enumerate(sorted(classes)):
        names = classes[folder][1].split("; ")
        expected[folder] = (label, classes[folder][0].lower(),
                            tuple(sorted(imagenet_of.get(n) or int(n.rpartition(" ")[2]) for n in names)))
    return expected


@pytest.fixture
def tree(tmp_path):
    return str(tmp_path), objectnet_tree(tmp_path)


def test_reads_the_113_classes_shared_with_imagenet(tree):
    root, expected = tree
    loaded = load_dataset("objectnet", root)
    assert loaded.num_classes == NUM_SHARED and len(loaded.test) == NUM_SHARED
    assert loaded.train_x is loaded.test and loaded.val == []  # test-only, as the ImageNet variants
    for record in loaded.test:
        folder = os.path.basename(os.path.dirname(record.impath))
        assert record.impath.endswith(".png") and record.impath.startswith(os.path.join(root, "objectnet", "objectnet-1.0", "images"))
        assert (record.label, record.classname) == expected[folder][:2]
    assert loaded.classnames[:3] == ["alarm clock", "banana", "chair"]  # sorted folders, lower-case names


def test_classes_map_to_imagenet_labels_through_the_release_files(tree):
    root, expected = tree
    subset = load_dataset("objectnet", root).imagenet_subset
    assert subset.members[:3] == ((409, 530), (954,), (423, 559, 765))
    assert subset.members == tuple(members for _, _, members in sorted(expected.values()))
    # ImageNet's classes in label order: classnames.txt sorted by folder, as ImageNet is labelled.
    assert len(subset.imagenet_classnames) == NUM_IMAGENET
    assert subset.imagenet_classnames[:2] == ("imagenet class 0", "imagenet class 1")


def test_shots_and_class_halves_are_ignored(tree):
    root, _ = tree
    assert load_dataset("objectnet", root, num_shots=4, subsample="new").num_classes == NUM_SHARED


def test_imagenet_a_covers_its_folders_and_sketch_all_classes(tmp_path):
    imagenet_a_tree(tmp_path)
    imagenet_sketch_tree(tmp_path)
    subset = load_dataset("imagenet_a", str(tmp_path)).imagenet_subset
    # imagenet_a_tree holds classes 1, 2, 4, 6, 7 of its 8-class classnames.txt, in wnid order.
    assert subset.members == ((1,), (2,), (4,), (6,), (7,))
    assert subset.imagenet_classnames[1] == "goldfish" and len(subset.imagenet_classnames) == 8
    assert load_dataset("imagenet_sketch", str(tmp_path)).imagenet_subset is None


def test_missing_mapping_file_is_named_with_the_layout(tree):
    root, _ = tree
    missing = os.path.join(root, "objectnet", "objectnet-1.0", "mappings", "objectnet_to_imagenet_1k.json")
    os.remove(missing)
    with pytest.raises(DatasetLayoutError) as error:
        load_dataset("objectnet", root)
    assert error.value.missing_path == missing and "python -m datasets.prepare objectnet" in str(error.value)


def test_inconsistent_mapping_files_are_named(tree):
    root, _ = tree
    mappings = os.path.join(root, "objectnet", "objectnet-1.0", "mappings")
    path = os.path.join(mappings, "objectnet_to_imagenet_1k.json")
    with open(path) as file:
        mapping = json.load(file)
    mapping["Banana"] = "plantain"
    write_json(path, mapping)
    with pytest.raises(DatasetFormatError, match="ImageNet class 'plantain' of ObjectNet class 'Banana' is not a line of"):
        load_dataset("objectnet", root)


def test_classnames_must_name_every_imagenet_class(tree):
    root, _ = tree
    path = os.path.join(root, "objectnet", "classnames.txt")
    with open(path) as file:
        lines = file.readlines()
    with open(path, "w") as file:
        file.writelines(lines[:500])
    with pytest.raises(DatasetFormatError, match="names only 500 classes: it must be a copy of imagenet/classnames.txt"):
        load_dataset("objectnet", root)


def test_missing_class_folder_is_named(tree):
    root, _ = tree
    folder = os.path.join(root, "objectnet", "objectnet-1.0", "images", "banana")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    with pytest.raises(DatasetLayoutError, match="lacks the folder of ObjectNet class 'Banana'"):
        load_dataset("objectnet", root)


def test_prepare_check_counts_the_shared_images(tree, capsys):
    root, _ = tree
    assert prepare_main(["objectnet", "--root", root, "--check"]) == 0
    out = capsys.readouterr().out
    assert f"test: {NUM_SHARED} images listed, {NUM_SHARED} found" in out and "published: 18574" in out
    assert get_spec("ObjectNet").border == 2


@pytest.mark.e2e
@requires_dassl
def test_fine_tuned_model_evaluates_objectnet_over_imagenet_classes(tmp_path, tiny_clip_path):
    root = tmp_path / "data"
    objectnet_tree(root)
    run = TrainRun("FT", "vit_b16_ep10", str(root), tiny_clip_path, tmp_path, dataset="objectnet")
    result = run.run(run.command(run.test_dir, "--eval-only", options=("DATASET.SUBSAMPLE_CLASSES", "all")), run.test_dir)
    assert result.returncode == 0 and "Traceback" not in result.output, result.output[-3000:]
    log = result.log
    assert "Cutting 2 pixels from every side of each test image" in log
    assert "ObjectNet covers 113 of the 1000 ImageNet classes of its classnames.txt" in log
    assert "# classes  113" in log and result.accuracy is not None
