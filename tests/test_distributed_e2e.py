"""torchrun with 2 processes on the CPU (gloo), end to end: the protocol scripts with GPUS=2, and a run
whose process 1 is killed mid-epoch, which ends the job naming that process and then resumes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO, TrainRun

pytestmark = [requires_dassl, pytest.mark.e2e]

TINY_RUN = [*FAST_OPTIONS, "DATASET.NUM_SHOTS", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]


def script_env(data_root, output, **extra):
    # This interpreter first on PATH: the scripts run in it as it is (scripts/setup_env.sh).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, DATA=data_root, OUTPUT=output, TRAINER="RAdaCoOp", SHOTS="2", GPUS="2", PATH=path,
                CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, **extra)


def run_script(name, env, *options):
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "rada", name), "synthetic_shapes", "1", *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def test_base_to_new_scripts_with_two_processes(synthetic_data_root, tiny_clip_path, tmp_path):
    env = script_env(synthetic_data_root, str(tmp_path))
    options = [*TINY_RUN, "MODEL.BACKBONE.NAME", str(tiny_clip_path)]
    trained = run_script("base2new_train.sh", env, *options)
    assert "+ python -m torch.distributed.run --nproc_per_node 2 --standalone" in trained
    train_dir = tmp_path / "base2new/train_base/synthetic_shapes/shots_2/RAdaCoOp/vit_b16_ep50_ctxv1/seed1"
    # One writer: one log, one tensorboard file, one checkpoint per module.
    assert [name for name in os.listdir(train_dir) if name.startswith("log.txt")] == ["log.txt"]
    assert len(os.listdir(train_dir / "tensorboard")) == 1
    for module in ("prompt_learner", "rada_head"):
        assert [name for name in os.listdir(train_dir / module) if name.startswith("model")] == ["model.pth.tar-1"]
        state = torch.load(train_dir / module / "model.pth.tar-1", weights_only=True)["state_dict"]
        assert not any(key.startswith("module.") for key in state)
    log = (train_dir / "log.txt").read_text()
    assert log.count("* result:") == 1 and "images/s" in log
    # 2 shots x 5 base classes = 10 images: 2 global batches of 4 (2 per process) per epoch.
    assert "epoch [1/1] batch [2/2]" in log and "epoch [1/1] batch [3/" not in log

    tested = run_script("base2new_test.sh", env, *options)
    assert "Skipping" not in tested
    test_dir = tmp_path / "base2new/test_new/synthetic_shapes/shots_2/RAdaCoOp/vit_b16_ep50_ctxv1/seed1"
    two_process_log = (test_dir / "log.txt").read_text()
    assert "* total: 100" in two_process_log  # each of the 100 new-class test images once

    # The same weights evaluated by one process give the same accuracy.
    single = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path / "single")
    evaluated = single.evaluate("DATASET.NUM_SHOTS", "2", model_dir=str(train_dir))
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    (two_process_line,) = re.findall(r"^\* result: .*$", two_process_log, re.MULTILINE)
    assert evaluated.accuracy is not None and f" accuracy={evaluated.accuracy:.2f}% " in two_process_line

    table = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "parse_results.py"), str(tmp_path),
                            "--protocol", "base2new", "--seeds", "1"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "synthetic_shapes" in table.stdout and f"{evaluated.accuracy:.2f}" in table.stdout, table.stdout


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def process_rank(pid):
    with open(f"/proc/{pid}/environ", "rb") as handle:
        variables = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    return int(variables.get(b"RANK", b"-1"))


def torchrun(output_dir, data_root, clip_path):
    """The command of a 2-process, 3-epoch RAdaCoOp run with the config's random augmentation, which
    each process draws from its own generators: a resumed run matches an uninterrupted one only if
    every process gets its own generators back."""
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", data_root, clip_path, output_dir)
    command = run.command(str(output_dir), options=(
        "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NUM_SHOTS", "16", "OPTIM.MAX_EPOCH", "3",
        "TRAIN.CHECKPOINT_FREQ", "1", "TRAIN.PRINT_FREQ", "5",
    ))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command[1:]]


def run_env():
    return dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", RADA_DIST_TIMEOUT_S="120")


def final_weights(output_dir):
    return {module: torch.load(os.path.join(output_dir, module, "model.pth.tar-3"), weights_only=True)["state_dict"]
            for module in ("prompt_learner", "rada_head")}


def test_a_killed_process_ends_the_job_and_the_run_resumes(synthetic_data_root, tiny_clip_path, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    done = subprocess.run(torchrun(uninterrupted, synthetic_data_root, tiny_clip_path), env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    interrupted = tmp_path / "interrupted"
    job = subprocess.Popen(torchrun(interrupted, synthetic_data_root, tiny_clip_path), env=run_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_epoch = interrupted / "rada_head" / "model.pth.tar-1"
    deadline = time.monotonic() + 300
    while not first_epoch.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0][-3000:]
    (victim,) = [pid for pid in children(job.pid) if process_rank(pid) == 1]
    os.kill(victim, signal.SIGKILL)  # in epoch 2 (80 images of 5 base classes: 10 global batches of 8)
    output, _ = job.communicate(timeout=120)  # torchrun stops process 0 too: no hang
    assert job.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]
    assert not (interrupted / "rada_head" / "model.pth.tar-3").exists()

    resumed = subprocess.run(torchrun(interrupted, synthetic_data_root, tiny_clip_path), env=run_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "(will resume training)" in resumed.stdout and "epoch [1/3]" not in resumed.stdout
    expected, actual = final_weights(uninterrupted), final_weights(interrupted)
    for module, state in expected.items():
        for key, value in state.items():
            assert torch.equal(actual[module][key], value), f"{module}.{key}"


def descendants(pid):
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def test_a_killed_two_process_script_run_resumes_by_its_own_command_and_is_then_skipped(
        synthetic_data_root, tiny_clip_path, tmp_path):
    """The documented way through the scripts with GPUS=2: the same command again after a kill -9 of
    one process mid-epoch resumes to the weights of an uninterrupted run; once more, it is skipped."""
    # 8 shots x 5 base classes = 40 images: 10 global batches of 4 per epoch, room to kill in epoch 2.
    options = ["OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
               "TRAIN.PRINT_FREQ", "1", "MODEL.BACKBONE.NAME", str(tiny_clip_path)]
    run_dir = "base2new/train_base/synthetic_shapes/shots_8/RAdaCoOp/vit_b16_ep50_ctxv1/seed1"

    def env(output):
        return {**script_env(synthetic_data_root, str(output), RADA_DIST_TIMEOUT_S="120"), "SHOTS": "8"}

    def weights(output):
        return {module: torch.load(output / run_dir / module / "model.pth.tar-2", weights_only=True)["state_dict"]
                for module in ("prompt_learner", "rada_head")}

    run_script("base2new_train.sh", env(tmp_path / "uninterrupted"), *options)

    interrupted = tmp_path / "interrupted"
    log = interrupted / run_dir / "log.txt"
    job = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "rada", "base2new_train.sh"), "synthetic_shapes", "1",
                            *options], cwd=REPO, env=env(interrupted), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline and not (
            log.is_file() and "epoch [2/2] batch [2/10]" in log.read_text()):
        time.sleep(0.02)
    assert job.poll() is None, job.communicate()[0][-3000:]
    (victim,) = [pid for pid in descendants(job.pid) if process_rank(pid) == 1]
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and not (interrupted / run_dir / "rada_head" / "model.pth.tar-2").exists(), output

    resumed = run_script("base2new_train.sh", env(interrupted), *options)
    assert "Found an unfinished run" in resumed and "(will resume training)" in resumed
    assert "epoch [1/2]" not in resumed
    expected, actual = weights(tmp_path / "uninterrupted"), weights(interrupted)
    for module, state in expected.items():
        for key, value in state.items():
            assert torch.equal(actual[module][key], value), f"{module}.{key}"

    again = run_script("base2new_train.sh", env(interrupted), *options)
    assert "already holds a finished run" in again and "torch.distributed.run" not in again
