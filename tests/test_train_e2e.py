"""train.py end to end (Dassl required): training, evaluation from --model-dir, resuming, and
clear errors for bad input. Each run is a subprocess on the synthetic dataset with the tiny CLIP;
the bad-input runs, which end before training, call train.main in this process."""

import os

import pytest
import torch

from tests.conftest import requires_dassl
from tests.train_harness import TrainRun

pytestmark = requires_dassl

CASES = [
    # trainer, config, registered (checkpointed) modules
    ("CoOp", "vit_b16_ep50_ctxv1", ["prompt_learner"]),
    ("RAda", "vit_b16_ep5", ["rada_head"]),
    ("RAdaCoOp", "vit_b16_ep50_ctxv1", ["prompt_learner", "rada_head"]),
]


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


def assert_evaluates_new_classes(run, modules):
    """--eval-only on the new classes loads each trained module's epoch-1 checkpoint and gives a result."""
    evaluated = run.evaluate()
    assert_clean(evaluated)
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and "# classes  5" in evaluated.log
    assert evaluated.accuracy is not None


@pytest.mark.parametrize("trainer,config,modules", CASES)
@pytest.mark.e2e
def test_train_one_epoch_then_evaluate_new_classes(trainer, config, modules, synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun(trainer, config, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train()
    assert_clean(trained)
    log = trained.log
    assert "epoch [1/1] batch [2/2]" in log and "eta" in log
    assert "* accuracy:" in log and "subsample=base" in log
    assert trained.accuracy is not None
    for module in modules:
        path = os.path.join(run.train_dir, module, "model.pth.tar-1")
        checkpoint = torch.load(path, weights_only=True)  # plain data: loads on current torch
        assert checkpoint["epoch"] == 1 and checkpoint["backbone"]["embed_dim"] == 32
        assert not any("token_prefix" in key for key in checkpoint["state_dict"])

    assert_evaluates_new_classes(run, modules)


@pytest.mark.e2e
def test_zero_shot_clip_evaluates_without_a_model(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("ZeroshotCLIP", "vit_b16", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.run(run.command(run.test_dir, "--eval-only", options=("DATASET.SUBSAMPLE_CLASSES", "all")), run.test_dir)
    assert_clean(result)
    assert "# classes  10" in result.log and result.accuracy is not None


@pytest.mark.e2e
def test_deterministic_runs_give_the_same_result(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    plain = run.train()
    run.train_dir = os.path.join(run.workdir, "deterministic")
    deterministic = run.train("DETERMINISTIC", "True")
    assert_clean(plain)
    assert_clean(deterministic)
    assert "deterministic algorithms on" in deterministic.output
    assert deterministic.accuracy == plain.accuracy  # on the CPU the switches change no result
    weights = [torch.load(os.path.join(folder, "rada_head", "model.pth.tar-1"), weights_only=True)["state_dict"]
               for folder in (plain.output_dir, deterministic.output_dir)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.e2e
def test_interrupted_run_resumes_from_its_last_checkpoint(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
    assert_clean(run.train("OPTIM.MAX_EPOCH", "2", "TRAIN.CHECKPOINT_FREQ", "1"))
    # Make the folder look like a run stopped during epoch 2: only epoch 1 was saved.
    for module in ("prompt_learner", "rada_head"):
        os.remove(os.path.join(run.train_dir, module, "model.pth.tar-2"))
        with open(os.path.join(run.train_dir, module, "checkpoint"), "w") as pointer:
            pointer.write("model.pth.tar-1\n")
    resumed = run.train("OPTIM.MAX_EPOCH", "2", "TRAIN.CHECKPOINT_FREQ", "1")
    assert_clean(resumed)
    assert "will resume training" in resumed.output
    assert "epoch [1/2]" not in resumed.output and "epoch [2/2] batch [2/2]" in resumed.output
    # Epoch 2 runs at the rate the schedule gives it: lr * (1 + cos(pi * 1 / 2)) / 2 = lr / 2.
    assert "lr 1.0000e-03" in resumed.output
    checkpoint = torch.load(os.path.join(run.train_dir, "rada_head", "model.pth.tar-2"), weights_only=True)
    assert checkpoint["epoch"] == 2


@pytest.mark.e2e
def test_evaluating_with_another_backbone_is_refused(synthetic_data_root, tiny_clip_path, tiny_resnet_clip_path, tmp_path):
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    assert_clean(run.train())
    other = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_resnet_clip_path, tmp_path)
    result = other.evaluate()
    assert result.returncode == 2 and "Traceback" not in result.output
    assert "another backbone" in result.output and "MODEL.BACKBONE.NAME" in result.output


def test_bad_input_ends_in_a_clear_message(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path, in_process=True)

    def expect_error(command, *phrases):
        result = run.run(command, str(tmp_path / "out"))
        assert result.returncode == 2, result.output[-2000:]
        assert "Traceback" not in result.output
        for phrase in phrases:
            assert phrase in result.output, (phrase, result.output[-2000:])

    command = run.command(str(tmp_path / "out"))
    expect_error([a if a != "RAdaCoOp" else "RAdaCoop" for a in command], "Unknown trainer 'RAdaCoop'", "RAdaCoOp")
    missing_root = str(tmp_path / "nowhere")
    expect_error([a if a != synthetic_data_root else missing_root for a in command], missing_root)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    expect_error([a if a != str(tiny_clip_path) else str(broken) for a in command], str(broken), "corrupt")
    offline_cache = tmp_path / "empty-cache"
    expect_error(
        [a if a != str(tiny_clip_path) else "ViT-B/16" for a in command] + ["MODEL.BACKBONE.CACHE_DIR", str(offline_cache)],
        "ViT-B-16.pt", "could not be downloaded",
    )
    expect_error(command + ["TRAINER.RADA.TYPO", "1"], "Unknown config key")
    no_run = run.evaluate(model_dir=str(tmp_path / "no-run"))
    assert no_run.returncode == 2 and "--model-dir must be" in no_run.output and "Traceback" not in no_run.output


@pytest.mark.e2e
def test_resnet_backbone_trains_and_evaluates(synthetic_data_root, tiny_resnet_clip_path, tmp_path):
    """Widths come from the loaded model: a ResNet CLIP goes through the same trainers."""
    run = TrainRun("RAdaCoOp", "rn50_ep50", synthetic_data_root, tiny_resnet_clip_path, tmp_path)
    trained = run.train()
    assert_clean(trained)
    assert "ResNet image encoder" in trained.log
    assert_clean(run.evaluate())
