"""A run folder written by the main of 077bb5f (tests/fixtures/run_077bb5f, before results records,
the run keeper and the preprocessing switch) still evaluates to its logged accuracy and resumes to
its own final weights."""

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_dassl
from tests.train_harness import TrainRun
from trainers.model.tiny_clip import save_tiny_clip

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_077bb5f"
# The tiny CLIP as the run named it; run.json compares MODEL.BACKBONE.NAME, so a resume needs this path.
ITS_CLIP = Path("/tmp/rada_077bb5f/tiny-vit.pt")
ITS_ACCURACY = 20.0  # the last `* result:` line of its log.txt

pytestmark = [pytest.mark.e2e, requires_dassl]


def its_run(synthetic_data_root, workdir):
    if not ITS_CLIP.is_file():
        ITS_CLIP.parent.mkdir(parents=True, exist_ok=True)
        save_tiny_clip(ITS_CLIP)  # deterministic: the same tensors the run was trained on
    return TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, ITS_CLIP, workdir)


def test_its_checkpoints_evaluate_to_its_logged_accuracy(synthetic_data_root, tmp_path):
    result = its_run(synthetic_data_root, tmp_path).evaluate(subsample="base", model_dir=str(FIXTURE))
    assert result.returncode == 0, result.output[-3000:]
    assert result.accuracy == ITS_ACCURACY


def test_it_resumes_from_its_first_set_to_its_own_final_weights(synthetic_data_root, tmp_path):
    run = its_run(synthetic_data_root, tmp_path)
    shutil.copytree(FIXTURE, run.train_dir)
    train_dir = Path(run.train_dir)
    for stale in (train_dir / "checkpoint_set.pth.tar-2", *train_dir.glob("*/model.pth.tar-2")):
        stale.unlink()  # as if killed before epoch 2 was saved
    for module in ("prompt_learner", "rada_head"):
        (train_dir / module / "checkpoint").write_text("model.pth.tar-1\n")
    result = run.train("OPTIM.MAX_EPOCH", "2", "TRAIN.CHECKPOINT_FREQ", "1")
    assert result.returncode == 0, result.output[-3000:]
    assert "Resumed the checkpoint set of epoch 1 (next epoch: 2)" in result.output
    assert result.accuracy == ITS_ACCURACY
    for module in ("prompt_learner", "rada_head"):
        resumed = torch.load(train_dir / module / "model.pth.tar-2", weights_only=True)["state_dict"]
        original = torch.load(FIXTURE / module / "model.pth.tar-2", weights_only=True)["state_dict"]
        assert resumed.keys() == original.keys()
        assert all(torch.equal(resumed[key], original[key]) for key in original)
