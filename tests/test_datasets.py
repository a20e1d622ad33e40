"""The pure dataset layer (no Dassl): CoOp layouts, splits, few-shot caches, base/new halves."""

import collections
import hashlib
import logging
import math
import os
import pickle
import random
import shutil
import sys
import types

import pytest

from datasets import (
    DatasetConfigError,
    DatasetFormatError,
    DatasetLayoutError,
    fewshot_cache_path,
    get_spec,
    load_dataset,
)
from datasets.cache import read_datum_pickle, write_datum_pickle
from datasets.records import Record
from datasets.specs import FGVC_LISTS, SPLIT_FILE
from tests.image_trees import DATASET_TREES, write_classnames

ALL = list(DATASET_TREES)
TRAINABLE = [name for name in ALL if not get_spec(name).test_only]
TEST_ONLY = [name for name in ALL if get_spec(name).test_only]
ORDERED_KINDS = (FGVC_LISTS, SPLIT_FILE)  # record order is fixed by a file, not by the file system


# Trees with many images are written once per session; each test gets its own dataset folder
# (so its own caches) whose image folder is a link to the shared one.
SHARED_TREES = ("Caltech101", "SyntheticShapes")


@pytest.fixture(scope="session")
def shared_trees(tmp_path_factory):
    written = {}

    def get(name):
        if name not in written:
            root = str(tmp_path_factory.mktemp(name))
            written[name] = root, DATASET_TREES[name](root)
        return written[name]

    return get


@pytest.fixture
def make_tree(tmp_path, shared_trees):
    """make_tree(name, root=None) -> (root, {split: [(impath, label, classname)]})."""

    def make(name, root=None):
        root = str(root or tmp_path / "data")
        if name not in SHARED_TREES:
            return root, DATASET_TREES[name](root)
        shared_root, expected = shared_trees(name)
        spec = get_spec(name)
        os.makedirs(spec.dataset_dir(root))
        os.symlink(spec.path(shared_root, spec.image_dir), spec.path(root, spec.image_dir))
        shutil.copy(spec.path(shared_root, spec.split_file), spec.dataset_dir(root))
        old, new = spec.dataset_dir(shared_root), spec.dataset_dir(root)
        return root, {split: [(new + p[len(old):], y, c) for p, y, c in rows] for split, rows in expected.items()}

    return make


def triples(records):
    return [(r.impath, r.label, r.classname) for r in records]


def relative(records, root):
    return [(os.path.relpath(r.impath, root), r.label, r.classname) for r in records]


def load(name, root, num_shots=-1, seed=1, subsample="all"):
    random.seed(seed)  # what Dassl's set_random_seed does before the dataset is built
    return load_dataset(name, root, num_shots=num_shots, seed=seed, subsample=subsample)


def per_label_counts(records):
    return collections.Counter(r.label for r in records)


# --- reading the layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_reads_every_split_of_the_coop_layout(name, make_tree):
    root, expected = make_tree(name)
    loaded = load(name, root)
    spec = get_spec(name)
    ordered = spec.kind in ORDERED_KINDS
    got = {"train": loaded.train_x, "val": loaded.val, "test": loaded.test}
    for split, rows in expected.items():
        assert (triples(got[split]) if ordered else sorted(triples(got[split]))) == (rows if ordered else sorted(rows)), split
    labels_and_names = sorted({(label, classname) for _, label, classname in expected.get("train", expected["test"])})
    assert loaded.classnames == [classname for _, classname in labels_and_names]
    assert loaded.num_classes == len(labels_and_names)
    if spec.test_only:  # Dassl derives class names from train_x, so variants pass test as train_x
        assert loaded.train_x is loaded.test and loaded.val == []
    if name == "ImageNet":  # CoOp evaluates on ImageNet's val set, passed as both val and test
        assert loaded.val is loaded.test


def test_caltech101_real_split_sizes(make_tree):
    root, _ = make_tree("Caltech101")
    loaded = load("Caltech101", root)
    assert (len(loaded.train_x), len(loaded.val), len(loaded.test)) == (4128, 1649, 2465)
    assert loaded.num_classes == 100
    assert loaded.classnames[:3] == ["face", "leopard", "motorbike"]  # Caltech101's renamed classes


def test_imagenet_a_and_r_relabel_their_subset_in_sorted_folder_order(make_tree):
    root, _ = make_tree("ImageNetA")
    loaded = load("ImageNetA", root)
    folders = sorted({os.path.basename(os.path.dirname(r.impath)) for r in loaded.test})
    assert folders == ["n01443537", "n01484850", "n01494475", "n01498041", "n01514668"]  # README.txt ignored
    for record in loaded.test:
        assert record.label == folders.index(os.path.basename(os.path.dirname(record.impath)))
    assert loaded.classnames == ["goldfish", "great white shark", "hammerhead shark", "stingray", "rooster"]


def test_imagenetv2_folder_i_is_the_class_on_line_i(make_tree):
    root, _ = make_tree("ImageNetV2")
    loaded = load("ImageNetV2", root)
    assert {(os.path.basename(os.path.dirname(r.impath)), r.label) for r in loaded.test} == {(str(i), i) for i in range(5)}
    assert loaded.classnames == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


@pytest.mark.parametrize("name", TEST_ONLY)
def test_test_only_datasets_ignore_shots_and_class_halves(name, make_tree):
    root, expected = make_tree(name)
    loaded = load(name, root, num_shots=1, subsample="base")
    assert sorted(triples(loaded.test)) == sorted(expected["test"])
    assert not os.path.exists(os.path.join(get_spec(name).dataset_dir(root), "split_fewshot"))


# --- base / new halves ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINABLE)
def test_base_and_new_halves(name, make_tree):
    root, _ = make_tree(name)
    full = load(name, root)
    base, new = load(name, root, subsample="base"), load(name, root, subsample="new")
    n = full.num_classes
    half = math.ceil(n / 2)
    assert (base.num_classes, new.num_classes) == (half, n - half)
    assert base.classnames == full.classnames[:half] and new.classnames == full.classnames[half:]
    for split in ("train_x", "val", "test"):
        whole = triples(getattr(full, split))
        assert triples(getattr(base, split)) == [row for row in whole if row[1] < half], split
        # New classes are relabelled from 0, keeping their images and names.
        assert triples(getattr(new, split)) == [(p, y - half, c) for p, y, c in whole if y >= half], split


# --- few-shot sampling and its cache -------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINABLE)
def test_few_shot_counts_and_cache_reuse(name, make_tree):
    root, _ = make_tree(name)
    full = load(name, root)
    shots = 5  # val gets min(5, 4) = 4; some classes have fewer images than that (all are kept)
    loaded = load(name, root, num_shots=shots, seed=1)
    available = per_label_counts(full.train_x)
    assert per_label_counts(loaded.train_x) == {y: min(n, shots) for y, n in available.items()}
    assert set(triples(loaded.train_x)) <= set(triples(full.train_x))
    cache_path = os.path.join(get_spec(name).dataset_dir(root), "split_fewshot", "shot_5-seed_1.pkl")
    assert fewshot_cache_path(get_spec(name).dataset_dir(root), 5, 1) == cache_path
    if name == "ImageNet":  # ImageNet caches train only and keeps its full val (= test)
        assert read_datum_pickle(cache_path, ("train",)).keys() == {"train"}
        assert triples(loaded.val) == triples(full.val)
    else:
        available_val = per_label_counts(full.val)
        assert per_label_counts(loaded.val) == {y: min(n, 4) for y, n in available_val.items()}
        assert read_datum_pickle(cache_path, ("train", "val"))["val"] == loaded.val

    random.seed(12345)  # a different random state: only the cache can give the same samples
    again = load_dataset(name, root, num_shots=shots, seed=1)
    assert triples(again.train_x) == triples(loaded.train_x) and triples(again.val) == triples(loaded.val)


@pytest.mark.parametrize("name", ["Caltech101", "DescribableTextures"])
def test_same_seed_same_samples_other_seed_other_samples(name, make_tree, tmp_path):
    first_root, _ = make_tree(name, tmp_path / "a")
    second_root, _ = make_tree(name, tmp_path / "b")
    first = relative(load(name, first_root, num_shots=2, seed=1).train_x, first_root)
    assert relative(load(name, second_root, num_shots=2, seed=1).train_x, second_root) == first
    assert relative(load(name, first_root, num_shots=2, seed=2).train_x, first_root) != first


def dassl_style_few_shot(items, num_shots):
    """Dassl's generate_fewshot_dataset written out plainly: random.sample per label."""
    by_label = collections.defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    picked = []
    for group in by_label.values():
        picked.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return picked


# FGVC's lists interleave the classes, so label order (first appearance) matters there.
@pytest.mark.parametrize("name", ["Caltech101", "FGVCAircraft", "ImageNet"])
def test_sampling_equals_a_plain_reimplementation_of_dassl(name, make_tree):
    root, _ = make_tree(name)
    full = load(name, root)
    random.seed(7)
    train = dassl_style_few_shot(triples(full.train_x), 3)
    val = dassl_style_few_shot(triples(full.val), 3) if name != "ImageNet" else triples(full.val)
    loaded = load(name, root, num_shots=3, seed=7)
    assert triples(loaded.train_x) == train and triples(loaded.val) == val


def test_imagenet_images_keep_directory_order(make_tree):
    """CoOp lists a class folder with os.listdir and samples from that order; sorting would change the picks."""
    root, _ = make_tree("ImageNet")
    loaded = load("ImageNet", root)
    class_dir = os.path.dirname(loaded.train_x[0].impath)
    in_class = [os.path.basename(r.impath) for r in loaded.train_x if os.path.dirname(r.impath) == class_dir]
    assert in_class == [name for name in os.listdir(class_dir) if not name.startswith(".")]


def _digest(records, image_dir):
    text = "\n".join(f"{os.path.relpath(r.impath, image_dir)}|{r.label}|{r.classname}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()


# Produced by CoOp's own Caltech101 class (KaiyangZhou/CoOp ff61507, Dassl 0.6.3, Python 3.11)
# on the real split file, after random.seed(SEED): lengths and sha256 of "relpath|label|name" lines.
COOP_GOLDEN = [
    (16, 1, "all", 1600, 400, 2465,
     "d10d2deccab942cc316c180e661d89367a0cdd15d5d5e8fa3790ac20a2e6da16",
     "8abb0335341dbfa18fecd01879f7a60d0624317b06b92f694da828d8a77e0af3"),
    (4, 2, "base", 200, 200, 1549,
     "f4d6a352eaebdc580523c3376b221a3cd469343cab22cc8359642c8e7c5ada2d",
     "490cb2d827312dec94d1ca8808c7209be581f3ddd2494b85ae9f5e82adbf5450"),
    (1, 3, "new", 50, 50, 916,
     "ff48dd792af8e3296517dc347ed6873dd10af5bc1000840d7e3f946a95b291d8",
     "71866eefd488efeb290361a84efbf1af8ea6d40d31100fe47534f85bbd36894e"),
]


@pytest.mark.parametrize("shots, seed, subsample, n_train, n_val, n_test, train_sha, val_sha", COOP_GOLDEN)
def test_same_samples_as_coop(make_tree, shots, seed, subsample, n_train, n_val, n_test, train_sha, val_sha):
    root, _ = make_tree("Caltech101")
    loaded = load("Caltech101", root, num_shots=shots, seed=seed, subsample=subsample)
    assert (len(loaded.train_x), len(loaded.val), len(loaded.test)) == (n_train, n_val, n_test)
    image_dir = get_spec("Caltech101").path(root, "101_ObjectCategories")
    assert (_digest(loaded.train_x, image_dir), _digest(loaded.val, image_dir)) == (train_sha, val_sha)


# --- missing or malformed input ------------------------------------------------------------------


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@pytest.mark.parametrize("name", ALL)
def test_missing_paths_are_reported_first_missing_first(name, make_tree, tmp_path):
    root, _ = make_tree(name)
    spec = get_spec(name)
    required = [spec.path(root, entry.path.rstrip("/")) for entry in spec.entries if entry.required]
    # Removing from the last to the first: each error names the earliest missing path.
    for path in reversed(required):
        _remove(path)
        with pytest.raises(DatasetLayoutError) as error:
            load(name, root)
        assert error.value.missing_path == path
        message = str(error.value)
        assert path in message and "Expected layout" in message
        assert f"python -m datasets.prepare {spec.stem} --root {root}" in message
    shutil.rmtree(spec.dataset_dir(root))
    with pytest.raises(DatasetLayoutError) as error:
        load(name, root)
    assert error.value.missing_path == spec.dataset_dir(root)
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError) as error:
        load(name, nowhere)
    assert error.value.missing_path == nowhere
    assert isinstance(error.value, FileNotFoundError)


def test_empty_root_says_to_pass_root():
    with pytest.raises(DatasetLayoutError, match="--root"):
        load_dataset("caltech101", "")


@pytest.mark.parametrize("name", ["DescribableTextures", "FGVCAircraft", "ImageNet"])
def test_missing_image_is_named(name, make_tree):
    root, expected = make_tree(name)
    load(name, root)  # ImageNet: the listing is now cached in preprocessed.pkl
    victim = expected["test"][-1][0]
    os.remove(victim)
    with pytest.raises(DatasetLayoutError) as error:
        load(name, root)
    assert error.value.missing_path == victim
    assert f"1 of the {len(expected['test'])} test images are missing" in str(error.value)


def test_imagenet_needs_classnames_only_to_build_its_cache(make_tree):
    root, _ = make_tree("ImageNet")
    first = load("ImageNet", root)
    spec = get_spec("ImageNet")
    os.remove(spec.path(root, "classnames.txt"))
    assert triples(load("ImageNet", root).train_x) == triples(first.train_x)  # from preprocessed.pkl
    os.remove(spec.path(root, "preprocessed.pkl"))
    with pytest.raises(DatasetLayoutError) as error:
        load("ImageNet", root)
    assert error.value.missing_path == spec.path(root, "classnames.txt")


def test_class_folder_without_a_class_name_is_a_format_error(make_tree):
    root, _ = make_tree("ImageNetR")
    write_classnames(get_spec("ImageNetR").path(root, "classnames.txt"), [("n01440764", "tench")])
    with pytest.raises(DatasetFormatError, match="n01484850 has no line in .*classnames.txt"):
        load("ImageNetR", root)


def test_imagenetv2_missing_class_folder_is_named(make_tree):
    root, _ = make_tree("ImageNetV2")
    folder = get_spec("ImageNetV2").path(root, "imagenetv2-matched-frequency-format-val", "3")
    shutil.rmtree(folder)
    with pytest.raises(DatasetLayoutError) as error:
        load("ImageNetV2", root)
    assert error.value.missing_path == folder


@pytest.mark.parametrize(
    "content, complaint",
    [
        ("<html>Google Drive - quota exceeded</html>", "not valid JSON"),
        ('{"train": [], "val": []}', "'train', 'val' and 'test'"),
        ('{"train": [["a.jpg", 0]], "val": [], "test": []}', "entry 0 of 'train'"),
    ],
)
def test_malformed_split_file_is_a_format_error(make_tree, content, complaint):
    root, _ = make_tree("DescribableTextures")
    split_path = get_spec("DescribableTextures").path(root, "split_zhou_DescribableTextures.json")
    with open(split_path, "w") as file:
        file.write(content)
    with pytest.raises(DatasetFormatError) as error:
        load("DescribableTextures", root)
    assert split_path in str(error.value) and complaint in str(error.value)


def test_fgvc_class_missing_from_variants_is_a_format_error(make_tree):
    root, _ = make_tree("FGVCAircraft")
    with open(get_spec("FGVCAircraft").path(root, "images_variant_val.txt"), "a") as file:
        file.write("1234567 Concorde\n")
    with pytest.raises(DatasetFormatError, match="'Concorde' of image 1234567 is not in variants.txt"):
        load("FGVCAircraft", root)


def test_bad_names_and_options_are_config_errors(make_tree):
    root, _ = make_tree("DescribableTextures")
    with pytest.raises(DatasetConfigError, match="Unknown dataset 'dtdd'.*DescribableTextures \\(dtd\\)"):
        load_dataset("dtdd", root)
    with pytest.raises(DatasetConfigError, match="SUBSAMPLE_CLASSES is 'half'"):
        load_dataset("dtd", root, subsample="half")


# --- caches with stale, foreign or broken content ------------------------------------------------


@pytest.mark.parametrize("name", ["DescribableTextures", "StanfordCars", "ImageNet"])
def test_moved_root_keeps_its_samples_and_rewrites_the_caches(name, make_tree, tmp_path, caplog):
    old_root, _ = make_tree(name, tmp_path / "old")
    before = load(name, old_root, num_shots=2, seed=1)
    new_root = str(tmp_path / "moved" / "elsewhere")
    os.makedirs(os.path.dirname(new_root))
    os.rename(old_root, new_root)

    random.seed(999)  # re-sampling would now pick other images
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        after = load_dataset(name, new_root, num_shots=2, seed=1)
    assert relative(after.train_x, new_root) == relative(before.train_x, old_root)
    assert relative(after.val, new_root) == relative(before.val, old_root)
    assert all(r.impath.startswith(new_root + os.sep) for r in after.train_x + after.test)
    spec = get_spec(name)
    assert f"written for the dataset at {spec.dataset_dir(old_root)}" in caplog.text
    cached = read_datum_pickle(fewshot_cache_path(spec.dataset_dir(new_root), 2, 1), ("train",))
    assert cached["train"] == after.train_x
    if name == "ImageNet":
        preprocessed = read_datum_pickle(spec.path(new_root, "preprocessed.pkl"), ("train", "test"))
        assert preprocessed["test"] == after.test


@pytest.mark.parametrize("resolvable_first", [False, True])
def test_cache_whose_paths_cannot_be_remapped_is_rebuilt(make_tree, tmp_path, caplog, resolvable_first):
    root, expected = make_tree("DescribableTextures", tmp_path / "a")
    fresh_root, _ = make_tree("DescribableTextures", tmp_path / "b")
    spec = get_spec("DescribableTextures")
    cache_path = fewshot_cache_path(spec.dataset_dir(root), 2, 1)
    # Written under /gone: the first entry exists under the current root, the ghost nowhere.
    real_path, label, classname = expected["train"][0]
    real = Record(real_path.replace(spec.dataset_dir(root), "/gone/dtd"), label, 0, classname)
    ghost = Record("/gone/dtd/images/banded/ghost.jpg", 0, 0, "banded")
    write_datum_pickle(cache_path, {"train": [real, ghost] if resolvable_first else [ghost], "val": [ghost]})
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        rebuilt = load("DescribableTextures", root, num_shots=2, seed=1)
    assert "Rebuilding" in caplog.text and "ghost.jpg" in caplog.text
    assert relative(rebuilt.train_x, root) == relative(load("DescribableTextures", fresh_root, num_shots=2, seed=1).train_x, fresh_root)
    assert read_datum_pickle(cache_path, ("train", "val"))["train"] == rebuilt.train_x


@pytest.mark.parametrize("content", [b"", b"\x80\x05garbage", pickle.dumps({"train": [1, 2]}), pickle.dumps(["train"])])
def test_damaged_cache_is_rebuilt(make_tree, tmp_path, content, caplog):
    root, _ = make_tree("DescribableTextures", tmp_path / "a")
    expected = relative(load("DescribableTextures", root, num_shots=2, seed=1).train_x, root)
    with open(fewshot_cache_path(get_spec("DescribableTextures").dataset_dir(root), 2, 1), "wb") as file:
        file.write(content)
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        assert relative(load("DescribableTextures", root, num_shots=2, seed=1).train_x, root) == expected
    assert "Rebuilding" in caplog.text


class _Trap:
    """Unpickling this calls open(marker, "w"): a cache must never run such code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_cache_with_foreign_objects_is_not_executed(make_tree, tmp_path):
    root, _ = make_tree("DescribableTextures")
    marker = str(tmp_path / "executed")
    cache_path = fewshot_cache_path(get_spec("DescribableTextures").dataset_dir(root), 2, 1)
    os.makedirs(os.path.dirname(cache_path))
    with open(cache_path, "wb") as file:
        pickle.dump({"train": [_Trap(marker)], "val": []}, file)
    loaded = load("DescribableTextures", root, num_shots=2, seed=1)
    assert not os.path.exists(marker)
    assert len(loaded.train_x) == 2 * 5


def test_unwritable_cache_folder_costs_only_the_cache(make_tree, caplog):
    root, _ = make_tree("DescribableTextures")
    with open(get_spec("DescribableTextures").path(root, "split_fewshot"), "w") as file:
        file.write("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        first = load("DescribableTextures", root, num_shots=2, seed=1)
    assert "continuing without it" in caplog.text
    assert triples(load("DescribableTextures", root, num_shots=2, seed=1).train_x) == triples(first.train_x)


# --- pickle compatibility with CoOp, without Dassl ----------------------------------------------


@pytest.fixture
def stand_in_dassl(monkeypatch):
    """A module at Dassl's import path holding a Datum like Dassl's (attributes _impath, ...)."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return Datum


def test_reads_a_cache_pickled_from_datum_objects(make_tree, stand_in_dassl):
    root, expected = make_tree("DescribableTextures")
    chosen = [row for row in expected["train"] if row[1] == 0][:1] + [row for row in expected["train"] if row[1] == 3][:2]
    cache_path = fewshot_cache_path(get_spec("DescribableTextures").dataset_dir(root), 2, 1)
    os.makedirs(os.path.dirname(cache_path))
    with open(cache_path, "wb") as file:  # what CoOp writes
        pickle.dump({"train": [stand_in_dassl(p, y, 0, c) for p, y, c in chosen], "val": []}, file, pickle.HIGHEST_PROTOCOL)
    loaded = load("DescribableTextures", root, num_shots=2, seed=1)
    assert triples(loaded.train_x) == chosen and loaded.val == []


def test_written_cache_unpickles_to_datum_objects(make_tree, stand_in_dassl):
    root, _ = make_tree("OxfordFlowers")
    loaded = load("OxfordFlowers", root, num_shots=3, seed=2)
    with open(fewshot_cache_path(get_spec("OxfordFlowers").dataset_dir(root), 3, 2), "rb") as file:
        content = pickle.load(file)  # what CoOp does
    assert set(content) == {"train", "val"}
    for key, records in (("train", loaded.train_x), ("val", loaded.val)):
        assert all(type(item) is stand_in_dassl for item in content[key])
        assert [(d._impath, d._label, d._domain, d._classname) for d in content[key]] == [
            (r.impath, r.label, r.domain, r.classname) for r in records
        ]
