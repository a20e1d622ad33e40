"""Crash-safe resume (Dassl required): a real train.py killed with SIGKILL mid-epoch resumes to the
weights of a run never killed; a second process cannot train into the same folder; a changed
configuration is refused instead of continuing the old run."""

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import requires_dassl
from tests.train_harness import REPO, TrainRun
from trainers.runs.results import read_run, run_finished

pytestmark = [requires_dassl, pytest.mark.e2e]

MODULES = ("prompt_learner", "rada_head")
# 3 epochs of 5 batches: room to kill the run in the middle of epoch 2.
SCHEDULE = ("OPTIM.MAX_EPOCH", "3", "DATASET.NUM_SHOTS", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "TRAIN.PRINT_FREQ", "1")
KILL_AT = "epoch [2/3] batch [2/5]"


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


def final_weights(run_dir):
    return {name: torch.load(os.path.join(run_dir, name, "model.pth.tar-3"), weights_only=True)["state_dict"]
            for name in MODULES}


def start_and_kill(run, run_dir):
    """Starts train.py into run_dir and SIGKILLs it once its log shows KILL_AT."""
    command = run.command(run_dir, options=("DATASET.SUBSAMPLE_CLASSES", "base", *SCHEDULE))
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(run_dir, "log.txt")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.isfile(log) and KILL_AT in open(log).read():
                break
            time.sleep(0.02)
        assert process.poll() is None, "train.py ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
    uninterrupted = run.train(*SCHEDULE)
    assert_clean(uninterrupted)

    killed_dir = str(tmp_path / "killed")
    start_and_kill(run, killed_dir)
    state = read_run(killed_dir)
    assert state.accuracy is None and state.reached.startswith("epoch [2/3]")  # the log shows every batch logged
    assert "epoch [1/3] batch [5/5]" in open(os.path.join(killed_dir, "log.txt")).read()

    resumed = run.run(run.command(killed_dir, options=("DATASET.SUBSAMPLE_CLASSES", "base", *SCHEDULE)), killed_dir)
    assert_clean(resumed)
    assert "will resume training" in resumed.output and "epoch [1/3]" not in resumed.output
    assert "Resumed the checkpoint set of epoch 1" in resumed.output

    expected, actual = final_weights(run.train_dir), final_weights(killed_dir)
    for name in MODULES:
        assert expected[name].keys() == actual[name].keys()
        for key, tensor in expected[name].items():
            assert torch.equal(tensor, actual[name][key]), f"{name}.{key} differs from the uninterrupted run"
    assert resumed.accuracy == uninterrupted.accuracy
    # The resumed run logs into log.txt-<timestamp>; the folder counts as one finished run.
    assert any(name.startswith("log.txt-") for name in os.listdir(killed_dir))
    assert run_finished(killed_dir) and read_run(killed_dir).accuracy == uninterrupted.accuracy


def test_changed_settings_are_refused_and_a_second_process_is_locked_out(synthetic_data_root, tiny_clip_path,
                                                                       tmp_path):
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    assert_clean(run.train("OPTIM.MAX_EPOCH", "2"))

    longer = run.train("OPTIM.MAX_EPOCH", "5", "TRAINER.RADA.ALPHA", "0.1")
    assert longer.returncode == 2 and "Traceback" not in longer.output
    assert "OPTIM.MAX_EPOCH: was 2, now 5" in longer.output and "TRAINER.RADA.ALPHA: was 0.0, now 0.1" in longer.output
    assert "--output-dir" in longer.output and "FORCE=1" in longer.output
    # Without run.json (e.g. a folder of an older version), the checkpoint set's own record refuses it.
    os.remove(os.path.join(run.train_dir, "run.json"))
    unrecorded = run.train("OPTIM.MAX_EPOCH", "5")
    assert unrecorded.returncode == 2 and "Traceback" not in unrecorded.output
    assert "OPTIM.MAX_EPOCH: was 2, now 5" in unrecorded.output and "resuming it would mix" in unrecorded.output

    from trainers.runs.run_lock import lock_run_dir

    holder = lock_run_dir(run.train_dir)  # as a running train.py holds it
    try:
        second = run.train("OPTIM.MAX_EPOCH", "2")
    finally:
        holder.close()
    assert second.returncode == 2 and "Traceback" not in second.output
    assert "one run per folder" in second.output and f"process {os.getpid()}" in second.output
