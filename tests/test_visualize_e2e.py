"""scripts/visualize.py on a tiny trained run: the files, and numbers equal to what the head computes."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from figures.head import BINS_PER_UNIT
from figures.style import DPI
from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO, TrainRun

pytestmark = [requires_dassl, pytest.mark.e2e]  # trains a run with train.py
# A large step so that one short run moves the mask visibly (and clips some entries to 0).
TRAIN_OPTIONS = ("OPTIM.LR", "0.1", "OPTIM.WARMUP_EPOCH", "0", "OPTIM.MAX_EPOCH", "2", "TEST.NO_TEST", "True")


def load_visualize():
    spec = importlib.util.spec_from_file_location("visualize", Path(REPO) / "scripts" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


visualize = load_visualize()


@pytest.fixture(scope="module")
def trained(synthetic_data_root, tiny_clip_path, tmp_path_factory):
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path_factory.mktemp("rada"))
    result = run.train(*TRAIN_OPTIONS)
    assert result.returncode == 0, result.output[-3000:]
    return run


def train_arguments(run, model_dir=None, subsample="new"):
    arguments = [
        "--root", run.data_root, "--trainer", "RAda",
        "--dataset-config-file", os.path.join(REPO, "configs", "datasets", "synthetic_shapes.yaml"),
        "--config-file", os.path.join(REPO, "configs", "trainers", "RAda", "vit_b16_ep5.yaml"),
    ]
    if model_dir:
        arguments += ["--model-dir", model_dir]
    return arguments + [*FAST_OPTIONS, "MODEL.BACKBONE.NAME", run.clip_path, "DATASET.SUBSAMPLE_CLASSES", subsample]


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_head_trained_on_base_classes_shown_on_new_ones(trained, tmp_path):
    out = tmp_path / "figures"
    arguments = train_arguments(trained, model_dir=trained.train_dir)
    assert visualize.main(["--out", str(out), "--images", "2", "--top-k", "3", *arguments]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert png_size(out / "mask_histogram.png") == (11 * DPI, int(4.2 * DPI))
    assert len(summary["rational"]) == 2
    for record in summary["rational"]:
        assert png_size(out / record["file"]) == (13 * DPI, int(6.5 * DPI))
        assert record["classes_shown"][0] == record["true_class"] and len(record["classes_shown"]) == 3

    # What the head computes on the same test images, through the model's own forward.
    trainer = visualize.build_trainer(visualize.train.parse_args(arguments))
    masks, labels = [], []
    with torch.no_grad():
        for batch in trainer.test_loader:
            images, batch_labels = trainer.parse_batch_test(batch)
            masks.append(trainer.model(images).mask.double())
            labels.append(batch_labels)
    masks, labels = torch.cat(masks), torch.cat(labels)
    images, classes, dim = masks.shape
    assert classes == 5  # the new half of the 10 synthetic classes
    histogram = summary["mask_histogram"]
    assert (histogram["images"], histogram["classes"], histogram["dim"]) == (images, classes, dim)
    assert sum(histogram["all"]["counts"]) == histogram["all"]["entries"] == images * classes * dim
    assert sum(histogram["true_class"]["counts"]) == images * dim
    assert histogram["all"]["clipped_share"] > 0, "the run should have clipped some mask entries"
    assert histogram["all"]["clipped_share"] == pytest.approx(float((masks == 0).double().mean()), abs=1e-12)
    assert histogram["all"]["mean_abs_deviation"] == pytest.approx(float((masks - 1).abs().mean()), rel=1e-9)
    true_rows = masks[torch.arange(images), labels]
    assert histogram["true_class"]["clipped_share"] == pytest.approx(float((true_rows == 0).double().mean()), abs=1e-12)


def test_identity_head_is_one_spike_at_one(trained, tmp_path):
    out = tmp_path / "identity"
    assert visualize.main(["--out", str(out), "--images", "1", "--max-images", "20", *train_arguments(trained)]) == 0
    histogram = json.loads((out / "summary.json").read_text())["mask_histogram"]
    counts = histogram["all"]["counts"]
    assert [i for i, count in enumerate(counts) if count] == [BINS_PER_UNIT]
    assert counts[BINS_PER_UNIT] == histogram["all"]["entries"] == 20 * 5 * histogram["dim"]
    assert histogram["accuracy"]["rada"] == histogram["accuracy"]["zero_shot"]


def test_training_curves_from_the_event_files(trained, tmp_path, capsys):
    assert visualize.main(["--curves", trained.train_dir, "--out", str(tmp_path)]) == 0
    assert png_size(tmp_path / "training_curves.png") == (11 * DPI, 7 * DPI)
    from figures.curves import read_scalars

    scalars = read_scalars(trained.train_dir)
    iterations = 2 * 2  # 2 epochs of 2 batches (20 base images at 4 shots x 5 classes, batch 8)
    for tag in ("train/loss", "train/acc", "train/lr", "train/mask_penalty"):
        assert [step for step, _ in scalars[tag]] == list(range(iterations)), tag
    assert scalars["train/mask_penalty"][0][1] == 0.0  # the first step sees the identity head
    assert scalars["train/mask_penalty"][-1][1] > 0.0


def test_trainers_without_a_head_or_weights_are_refused(trained, tmp_path, capsys):
    arguments = train_arguments(trained)
    arguments[arguments.index("RAda")] = "RAdaTTT"
    assert visualize.main(["--out", str(tmp_path), *arguments]) == 2
    assert "--trainer RAda" in capsys.readouterr().err
    assert visualize.main(["--curves", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "No TensorBoard event files" in capsys.readouterr().err
