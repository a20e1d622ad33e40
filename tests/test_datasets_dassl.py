"""The Dassl glue: registration, build_dataset, DataManager, and CoOp-compatible caches."""

import os
import pickle
import random

import pytest

from datasets import DatasetLayoutError, fewshot_cache_path, get_spec, load_dataset
from tests.conftest import requires_dassl
from tests.image_trees import DATASET_TREES

pytestmark = requires_dassl

ALL = list(DATASET_TREES)


@pytest.fixture(scope="module")
def dassl():
    import yacs.config
    from dassl.config import get_cfg_default
    from dassl.data import DataManager
    from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum, build_dataset

    import datasets.dassl_glue  # noqa: F401  (registers the datasets)

    def make_cfg(name, root, num_shots=-1, seed=1, subsample="all"):
        cfg = get_cfg_default()
        if "SUBSAMPLE_CLASSES" not in cfg.DATASET:  # trainers/config.py adds it in train.py
            cfg.DATASET.SUBSAMPLE_CLASSES = "all"
        cfg.merge_from_other_cfg(yacs.config.CfgNode({"DATASET": {"NAME": get_spec(name).name}}))
        cfg.DATASET.ROOT, cfg.DATASET.NUM_SHOTS, cfg.SEED = str(root), num_shots, seed
        cfg.DATASET.SUBSAMPLE_CLASSES = subsample
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
        cfg.DATALOADER.TEST.BATCH_SIZE = 4
        cfg.INPUT.SIZE = (224, 224)
        cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
        cfg.VERBOSE = False
        return cfg

    def build(cfg):
        random.seed(cfg.SEED)  # as train.py's set_random_seed
        return build_dataset(cfg)

    return {"cfg": make_cfg, "build": build, "DataManager": DataManager, "Datum": Datum,
            "DatasetBase": DatasetBase, "registry": DATASET_REGISTRY}


def rows(items):
    return [(d.impath, d.label, d.domain, d.classname) for d in items or []]


def test_every_dataset_is_registered_under_coop_names(dassl):
    assert set(ALL) <= set(dassl["registry"].registered_names())
    for name in ALL:
        assert dassl["registry"].get(name).__name__ == name


@pytest.mark.parametrize("name", ALL)
def test_build_dataset_gives_datums_equal_to_the_pure_layer(name, dassl, tmp_path):
    DATASET_TREES[name](tmp_path)
    test_only = get_spec(name).test_only
    cfg = dassl["cfg"](name, tmp_path, num_shots=-1 if test_only else 2, subsample="all" if test_only else "new")
    dataset = dassl["build"](cfg)
    random.seed(1)
    pure = load_dataset(name, str(tmp_path), num_shots=cfg.DATASET.NUM_SHOTS, seed=1, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
    assert all(type(item) is dassl["Datum"] for item in dataset.train_x + dataset.test)
    assert rows(dataset.train_x) == rows(pure.train_x) and rows(dataset.test) == rows(pure.test)
    assert rows(dataset.val) == rows(pure.val)
    assert dataset.classnames == pure.classnames and dataset.num_classes == pure.num_classes
    if test_only:
        assert dataset.val is None and rows(dataset.train_x) == rows(dataset.test)
    assert dataset.dataset_dir == get_spec(name).dataset_dir(str(tmp_path))


@pytest.mark.parametrize("name", ALL)
def test_data_manager_yields_a_batch(name, dassl, tmp_path):
    DATASET_TREES[name](tmp_path)
    cfg = dassl["cfg"](name, tmp_path, num_shots=-1 if get_spec(name).test_only else 2)
    random.seed(1)
    manager = dassl["DataManager"](cfg)
    batch = next(iter(manager.train_loader_x))
    assert tuple(batch["img"].shape) == (4, 3, 224, 224)
    assert int(batch["label"].max()) < manager.num_classes
    test_batch = next(iter(manager.test_loader))
    assert tuple(test_batch["img"].shape[1:]) == (3, 224, 224)


def test_glue_cache_is_a_pickle_of_dassl_datums(dassl, tmp_path):
    DATASET_TREES["OxfordPets"](tmp_path)
    dataset = dassl["build"](dassl["cfg"]("OxfordPets", tmp_path, num_shots=3, seed=2))
    with open(fewshot_cache_path(get_spec("OxfordPets").dataset_dir(str(tmp_path)), 3, 2), "rb") as file:
        cached = pickle.load(file)  # exactly what CoOp does with it
    assert all(type(item) is dassl["Datum"] for item in cached["train"] + cached["val"])
    assert rows(cached["train"]) == rows(dataset.train_x) and rows(cached["val"]) == rows(dataset.val)


def test_glue_uses_a_cache_written_by_coop(dassl, tmp_path):
    expected = DATASET_TREES["Food101"](tmp_path)
    datum = dassl["Datum"]
    chosen = [datum(impath=p, label=y, classname=c) for p, y, c in expected["train"] if y in (1, 4)][:3]
    path = fewshot_cache_path(get_spec("Food101").dataset_dir(str(tmp_path)), 8, 3)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as file:  # CoOp's writer
        pickle.dump({"train": chosen, "val": chosen[:1]}, file, protocol=pickle.HIGHEST_PROTOCOL)
    dataset = dassl["build"](dassl["cfg"]("Food101", tmp_path, num_shots=8, seed=3))
    assert rows(dataset.train_x) == rows(chosen) and rows(dataset.val) == rows(chosen[:1])


@pytest.mark.parametrize("name", ["Caltech101", "FGVCAircraft"])
def test_sampling_equals_dassl_generate_fewshot_dataset(name, dassl, tmp_path):
    DATASET_TREES[name](tmp_path)
    full = dassl["build"](dassl["cfg"](name, tmp_path))
    random.seed(5)
    train = full.generate_fewshot_dataset(full.train_x, num_shots=16)
    val = full.generate_fewshot_dataset(full.val, num_shots=4)
    ours = dassl["build"](dassl["cfg"](name, tmp_path, num_shots=16, seed=5))
    assert rows(ours.train_x) == rows(train) and rows(ours.val) == rows(val)


def test_layout_errors_reach_the_caller(dassl, tmp_path):
    with pytest.raises(DatasetLayoutError) as error:
        dassl["build"](dassl["cfg"]("EuroSAT", tmp_path))
    assert error.value.missing_path == os.path.join(str(tmp_path), "eurosat")
