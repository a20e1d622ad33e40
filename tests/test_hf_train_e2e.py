"""train.py end to end on a Hugging Face model (Dassl required): the head-only trainers train and
evaluate on a tiny transformers CLIP saved with save_pretrained (train.main in this process);
prompt learners and a missing model end in clear messages."""

import os

import pytest
import torch

from tests.conftest import requires_dassl
from tests.train_harness import TrainRun

pytestmark = requires_dassl

# The 100 test images of the base classes, few views: a short run.
TTT_OPTIONS = ("DATASET.SUBSAMPLE_CLASSES", "base", "DATALOADER.TEST.BATCH_SIZE", "4", "TRAINER.TTT.N_VIEWS", "3",
               "TRAIN.PRINT_FREQ", "50")


@pytest.fixture
def hf_clip(tiny_hf_path):
    return "hf:" + tiny_hf_path("clip")


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


@pytest.mark.e2e
@pytest.mark.parametrize("trainer, config, modules", [
    ("RAda", "vit_b16_ep5", ["rada_head"]),
    ("RAdaFT", "vit_b16_ep10", ["image_encoder", "rada_head"]),
])
def test_train_one_epoch_then_evaluate_new_classes(trainer, config, modules, synthetic_data_root, hf_clip, tmp_path):
    run = TrainRun(trainer, config, synthetic_data_root, hf_clip, tmp_path, in_process=True)
    trained = run.train()
    assert_clean(trained)
    # The model's own preprocessing replaces the OpenAI values of the shipped configs.
    assert "INPUT.SIZE (32, 32)" in trained.output and "transformers CLIPModel" in trained.output
    assert "epoch [1/1] batch [2/2]" in trained.output and trained.accuracy is not None
    for module in modules:
        checkpoint = torch.load(os.path.join(run.train_dir, module, "model.pth.tar-1"), weights_only=True)
        assert checkpoint["backbone"]["family"] == "hf" and checkpoint["backbone"]["embed_dim"] == 16
    evaluated = run.evaluate()
    assert_clean(evaluated)
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.output
    assert "subsample=new" in evaluated.output and evaluated.accuracy is not None


@pytest.mark.e2e
def test_zero_shot_and_test_time_training_from_the_identity_head(synthetic_data_root, hf_clip, tmp_path):
    """With no steps, RAdaTTT from the identity head predicts exactly as zero-shot classification."""
    clip = TrainRun("ZeroshotCLIP", "vit_b16", synthetic_data_root, hf_clip, tmp_path / "clip", in_process=True)
    zero_shot = clip.run(clip.command(clip.test_dir, "--eval-only", options=("DATASET.SUBSAMPLE_CLASSES", "base")),
                         clip.test_dir)
    assert_clean(zero_shot)
    ttt = TrainRun("RAdaTTT", "vit_b16_imagenet", synthetic_data_root, hf_clip, tmp_path / "ttt", in_process=True)
    no_steps = ttt.run(ttt.command(ttt.test_dir, "--eval-only", options=(*TTT_OPTIONS, "TRAINER.TTT.STEPS", "0")),
                       ttt.test_dir)
    assert_clean(no_steps)
    assert "* zero-shot accuracy:" in no_steps.output
    assert no_steps.accuracy == zero_shot.accuracy
    adapted_dir = ttt.test_dir + "-adapted"
    adapted = ttt.run(ttt.command(adapted_dir, "--eval-only", options=TTT_OPTIONS), adapted_dir)
    assert_clean(adapted)
    assert adapted.accuracy is not None


def assert_refused(result, *phrases):
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, (phrase, result.output[-3000:])


def test_prompt_learners_are_refused_with_the_supported_trainers(synthetic_data_root, hf_clip, tmp_path):
    run = TrainRun("CoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, hf_clip, tmp_path, in_process=True)
    assert_refused(run.train(), "CoOp learns prompt embeddings", "not supported for this backbone",
                   "ZeroshotCLIP", "RAda,", "RAdaTTT")


def test_offline_missing_model_ends_in_a_clear_message(synthetic_data_root, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when the hub is imported
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, "hf:some-org/some-clip", tmp_path, in_process=True)
    result = run.train("MODEL.BACKBONE.CACHE_DIR", str(tmp_path / "hub"))
    assert_refused(result, "'some-org/some-clip'", str(tmp_path / "hub" / "models--some-org--some-clip"),
                   "hf download some-org/some-clip")
