"""The synthetic colour-shape dataset for the offline demo."""

import collections
import os
import random
import time

import numpy as np
import pytest
from PIL import Image

from datasets import get_spec, load_dataset
from datasets.synthetic import CLASSES, COLOURS, IMAGE_SIZE, generate, main

SPEC = get_spec("SyntheticShapes")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    started = time.perf_counter()
    generate(root)
    return root, time.perf_counter() - started


def test_generation_is_fast(generated):
    _, seconds = generated
    assert seconds < 20


def test_loads_as_a_16_shot_coop_dataset(generated, tmp_path):
    root, _ = generated
    random.seed(1)
    loaded = load_dataset("synthetic_shapes", root, num_shots=16, seed=1)
    assert loaded.classnames == [f"{colour} {shape}" for colour, shape in CLASSES]
    assert collections.Counter(r.label for r in loaded.train_x) == {label: 16 for label in range(10)}
    assert collections.Counter(r.label for r in loaded.val) == {label: 4 for label in range(10)}
    assert len(loaded.test) == 200
    base = load_dataset("synthetic_shapes", root, subsample="base")
    assert base.classnames == loaded.classnames[:5]


def test_neither_colour_nor_shape_alone_names_the_class():
    colours = collections.Counter(colour for colour, _ in CLASSES)
    shapes = collections.Counter(shape for _, shape in CLASSES)
    assert len(set(CLASSES)) == len(CLASSES) == 10
    assert min(colours.values()) >= 2 and min(shapes.values()) >= 2


def _colour_mask(pixels, colour):
    return np.abs(pixels - np.array(COLOURS[colour])).max(axis=2) < 45


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_images_show_their_class_colour_at_varied_places(generated, label):
    root, _ = generated
    colour, _ = CLASSES[label]
    images = [r.impath for r in load_dataset("synthetic_shapes", root).test if r.label == label]
    centres = []
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        mask = _colour_mask(pixels, colour)
        assert mask.mean() > 0.03, f"{path} hardly shows {colour}"
        for other in COLOURS:
            if other != colour:
                assert _colour_mask(pixels, other).mean() < mask.mean(), f"{path} shows more {other} than {colour}"
        rows, cols = np.nonzero(mask)
        centres.append((rows.mean(), cols.mean()))
    assert np.std(centres, axis=0).min() > 6  # the shape moves around


def test_second_run_writes_nothing(generated):
    root, _ = generated
    image = get_spec("SyntheticShapes").path(root, "images", "red_circle", "red_circle_0001.jpg")
    before = os.stat(image).st_mtime_ns
    time.sleep(0.01)
    generate(root)
    assert os.stat(image).st_mtime_ns == before


def test_missing_image_is_regenerated_identically(tmp_path):
    root = str(tmp_path)
    generate(root)
    image = SPEC.path(root, "images", "blue_star", "blue_star_0007.jpg")
    with open(image, "rb") as file:
        original = file.read()
    os.remove(image)
    generate(root)
    with open(image, "rb") as file:
        assert file.read() == original


def test_seed_changes_the_images(tmp_path, generated):
    root, _ = generated
    generate(str(tmp_path), seed=1)
    relpath = os.path.join("images", "green_star", "green_star_0003.jpg")
    with open(SPEC.path(root, relpath), "rb") as default, open(SPEC.path(str(tmp_path), relpath), "rb") as reseeded:
        assert default.read() != reseeded.read()


def test_command_line(tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 0
    assert "configs/datasets/synthetic_shapes.yaml" in capsys.readouterr().out
    assert load_dataset("SyntheticShapes", str(tmp_path)).num_classes == 10
