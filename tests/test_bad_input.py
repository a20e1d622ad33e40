"""Bad input ends in one line naming the key and its valid range, exit code 2, no traceback.

Every run calls train.main(argv) in this process (tests/train_harness.py): the configuration is
refused before the trainer is built, or while it is built, so no run trains.
"""

import os

import pytest

from tests.conftest import requires_dassl
from tests.train_harness import TrainRun

pytestmark = requires_dassl


def error_line(result):
    """The one error line of a refused run (asserting exit code 2 and no traceback)."""
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output[-3000:]
    assert result.output.rstrip().endswith(errors[0])  # one line: nothing follows it
    return errors[0]


@pytest.fixture
def rada_coop(synthetic_data_root, tiny_clip_path, tmp_path):
    return TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path, in_process=True)


@pytest.mark.parametrize("key, value, shown, valid", [
    ("DATALOADER.TRAIN_X.BATCH_SIZE", "0", "0", "a whole number >= 1"),
    ("DATALOADER.TRAIN_X.BATCH_SIZE", "-8", "-8", "a whole number >= 1"),
    ("DATALOADER.TEST.BATCH_SIZE", "0", "0", "a whole number >= 1"),
    ("DATALOADER.TEST.BATCH_SIZE", "-1", "-1", "a whole number >= 1"),
    ("DATALOADER.NUM_WORKERS", "-1", "-1", "a whole number >= 0"),
    ("OPTIM.LR", "-0.002", "-0.002", "a number >= 0"),
    ("TRAINER.RADA.TEMP", "0", "0.0", "a number > 0"),  # a whole number for a float key is taken as a float
    ("TRAINER.RADA.NUM_HEADS", "0", "0", "a whole number >= 1"),
    ("TRAINER.RADA.NUM_HEADS", "3", "3", "a divisor of the feature width 32 of this CLIP (e.g. 1, 2, 4, 8, 16, 32)"),
    ("TRAINER.RADA.ALPHA", "-1", "-1.0", "a number >= 0"),
    ("TRAINER.ADAPTER.RATIO", "half", "half (a str)", "a number in (0, 1]"),
    ("TRAINER.ADAPTER.TEXT", "yes", "yes (a str)", "a bool"),
    ("TRAINER.COOP.PREC", "fp8", "'fp8'", "one of fp16, fp32, amp"),
    ("INPUT.PREPROCESS", "model", "'model'", "one of auto, backbone, config"),
])
def test_value_out_of_range(key, value, shown, valid, rada_coop):
    line = error_line(rada_coop.train(key, value))
    assert f"{key} is {shown}; it must be" in line and valid in line


def test_unregistered_dataset_lists_the_close_matches(rada_coop):
    line = error_line(rada_coop.train("DATASET.NAME", "Caltech10"))
    assert "DATASET.NAME 'Caltech10' is not a registered dataset (did you mean Caltech101?)" in line
    assert "OxfordPets" in line  # the registered names follow


def test_missing_trainer(rada_coop):
    command = rada_coop.command(rada_coop.train_dir)
    flag = command.index("--trainer")
    line = error_line(rada_coop.run(command[:flag] + command[flag + 2:], rada_coop.train_dir))
    assert "--trainer is missing: name one of" in line and "RAdaCoOp" in line


def test_output_folder_that_cannot_be_created(synthetic_data_root, tiny_clip_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, blocker, in_process=True)
    line = error_line(run.train())
    assert f"OUTPUT_DIR (--output-dir) {run.train_dir} cannot be created" in line


def test_root_at_the_dataset_folder_itself_names_its_parent(synthetic_data_root, tiny_clip_path, tmp_path):
    dataset_folder = os.path.join(synthetic_data_root, "synthetic_shapes")
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", dataset_folder, tiny_clip_path, tmp_path, in_process=True)
    line = error_line(run.train())
    assert f"--root {dataset_folder} is the dataset folder itself" in line
    assert line.endswith(f"pass --root {synthetic_data_root}")


@pytest.mark.parametrize("key, value, named", [
    ("TRAINER.RADA.PREC", "fp32", "TRAINER.RADA.PREC"),
    ("TRAINER.MAPLE.PREC", "amp", "TRAINER.MAPLE.PREC"),
])
def test_precision_key_the_trainer_ignores(key, value, named, rada_coop):
    line = error_line(rada_coop.train(key, value))
    assert f"RAdaCoOp takes CLIP's precision from TRAINER.COOP.PREC and would ignore {named}" in line


def test_more_shots_than_a_class_has_warns_with_the_real_count(synthetic_data_root, rada_coop):
    from datasets import load_dataset
    from datasets.fewshot import group_by_label

    loaded = load_dataset("synthetic_shapes", synthetic_data_root)
    smallest = min(len(items) for items in group_by_label(loaded.train_x).values())
    command = rada_coop.command(rada_coop.train_dir, "--no-train", options=("DATASET.NUM_SHOTS", "1000"))
    result = rada_coop.run(command, rada_coop.train_dir)
    assert result.returncode == 0, result.output[-3000:]
    assert (f"DATASET.NUM_SHOTS is 1000 but 10 of the 10 classes of SyntheticShapes have fewer training images "
            f"(the smallest {smallest})") in result.output
