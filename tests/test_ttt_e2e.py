"""Test-time training end to end (Dassl required): scripts/rada/ttt.sh and train.py with the tiny CLIP
on the synthetic dataset, from the identity head and from trained RAda / RAdaCoOp runs."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import requires_dassl
from tests.run_logs import load_parse_results
from tests.train_harness import REPO, RunResult, TrainRun

pytestmark = requires_dassl

# Few views and no loader workers keep a run of the 200 test images short.
TTT_OPTIONS = ["DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4", "TRAINER.TTT.N_VIEWS", "7",
               "TRAIN.PRINT_FREQ", "50"]
ZERO_SHOT_LINE = re.compile(r"^\* zero-shot accuracy: ([0-9.]+)%", re.MULTILINE)
RESULT_LINE = re.compile(r"^\* result: .*accuracy=([0-9.]+)%", re.MULTILINE)


@pytest.fixture(autouse=True)
def single_threaded_torch(monkeypatch):
    """Many small tensor operations per image: on a busy CI machine, torch's spinning worker threads
    slow them down tens of times (the DataLoader's workers are single-threaded for the same reason)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_ttt_script(dataset, seed, data_root, clip_path, output, *options, **env):
    environment = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", RADA_SKIP_SETUP="1",
                       PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
                       DATA=data_root, OUTPUT=str(output), **env)
    command = ["bash", "scripts/rada/ttt.sh", dataset, str(seed), "MODEL.BACKBONE.NAME", str(clip_path),
               *TTT_OPTIONS, *options]
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    return RunResult(done.returncode, done.stdout + done.stderr, str(output))


def accuracies(log):
    """(test-time trained, zero-shot) accuracy of a test-time training log."""
    return float(RESULT_LINE.findall(log)[-1]), float(ZERO_SHOT_LINE.findall(log)[-1])


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as handle:
        return handle.read()


@pytest.mark.e2e
def test_script_from_the_identity_head_then_results_table(synthetic_data_root, tiny_clip_path, tmp_path):
    result = run_ttt_script("synthetic_shapes", 1, synthetic_data_root, tiny_clip_path, tmp_path)
    assert_clean(result)
    run_dir = tmp_path / "ttt/synthetic_shapes/shots_0/RAdaTTT/vit_b16_finegrained/seed1"
    log = read_log(run_dir)
    assert "Test-time training starts from the identity head" in log
    assert "per image the original and 7 random resized crops with AugMix" in log
    progress = re.findall(r"^test-time training \[(\d+)/200\] acc [0-9.]+% \(zero-shot [0-9.]+%\) .* eta ", log, re.MULTILINE)
    assert progress == ["52", "100", "152", "200"]  # every 50 images (batches of 4) and at the end
    assert "test-time training [200/200]" in log
    assert "* accuracy:" in log and "trainer=RAdaTTT" in log and "split=test" in log
    adapted, zero_shot = accuracies(log)
    assert 0 <= adapted <= 100 and 0 <= zero_shot <= 100

    parse_results = load_parse_results()
    table = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "parse_results.py"), str(tmp_path),
                            "--protocol", "ttt", "--seeds", "1"], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "from the identity head" in table.stdout and f"| {adapted:.2f} " in table.stdout
    assert parse_results.parse_log(run_dir / "log.txt").accuracy == adapted

    again = run_ttt_script("synthetic_shapes", 1, synthetic_data_root, tiny_clip_path, tmp_path)
    assert again.returncode == 0 and "Skipping" in again.output


@pytest.mark.e2e
def test_no_steps_from_the_identity_head_is_zero_shot(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaTTT", "vit_b16_imagenet", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.run(run.command(run.test_dir, "--eval-only", options=(*TTT_OPTIONS, "TRAINER.TTT.STEPS", "0")),
                     run.test_dir)
    assert_clean(result)
    adapted, zero_shot = accuracies(result.log)
    assert adapted == zero_shot
    clip = TrainRun("ZeroshotCLIP", "vit_b16", synthetic_data_root, tiny_clip_path, tmp_path / "clip")
    clip_result = clip.run(clip.command(clip.test_dir, "--eval-only", options=("DATASET.SUBSAMPLE_CLASSES", "all")),
                           clip.test_dir)
    assert_clean(clip_result)
    # The synthetic dataset's zero-shot template is the generic "a photo of a {}.", RAdaTTT's too.
    assert zero_shot == clip_result.accuracy


@pytest.mark.e2e
def test_script_from_a_trained_rada_head(synthetic_data_root, tiny_clip_path, tmp_path):
    rada = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path / "rada")
    assert_clean(rada.train())
    evaluated = rada.evaluate(subsample="base")  # the trained head on the test split, without test-time training
    assert_clean(evaluated)

    result = run_ttt_script("synthetic_shapes", 1, synthetic_data_root, tiny_clip_path, tmp_path / "out",
                            "DATASET.SUBSAMPLE_CLASSES", "base", MODEL_DIR=rada.train_dir, SHOTS="4")
    assert_clean(result)
    log = read_log(tmp_path / "out/ttt/synthetic_shapes/shots_4/RAdaTTT/vit_b16_finegrained/seed1")
    assert f"Load {os.path.join(rada.train_dir, 'rada_head', 'model.pth.tar-1')} to rada_head" in log
    _, zero_shot = accuracies(log)
    # "Zero-shot" is the loaded model before test-time training: RAda's own accuracy.
    assert zero_shot == evaluated.accuracy


@pytest.mark.e2e
def test_rada_coop_run_with_its_context(synthetic_data_root, tiny_clip_path, tmp_path):
    coop = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path / "coop")
    assert_clean(coop.train())

    run = TrainRun("RAdaCoOpTTT", "vit_b16_finegrained", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.evaluate(*TTT_OPTIONS, subsample="base", model_dir=coop.train_dir)
    assert_clean(result)
    for module in ("prompt_learner", "rada_head"):
        assert f"Load {os.path.join(coop.train_dir, module, 'model.pth.tar-1')} to {module}" in result.log
    assert "Test-time training of prompt_learner, rada_head on 100 images" in result.log
    assert result.accuracy is not None

    # RAdaTTT would drop the learned context: refused with the trainer to use instead.
    wrong = TrainRun("RAdaTTT", "vit_b16_finegrained", synthetic_data_root, tiny_clip_path, tmp_path / "wrong")
    refused = wrong.evaluate(*TTT_OPTIONS, subsample="base", model_dir=coop.train_dir)
    assert refused.returncode == 2 and "Traceback" not in refused.output
    assert "also holds trained prompt_learner" in refused.output and "RAdaCoOpTTT for a RAdaCoOp run" in refused.output


def test_bad_settings_end_in_a_clear_message(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaTTT", "vit_b16_imagenet", synthetic_data_root, tiny_clip_path, tmp_path, in_process=True)
    for options, message in [
        (("TRAINER.TTT.CONFIDENT_FRACTION", "0.0"),
         "TRAINER.TTT.CONFIDENT_FRACTION is 0.0; it must be a number in (0, 1]"),
        (("TRAINER.TTT.ADAPT_PROMPTS", "True"), "use RAdaCoOpTTT to adapt a CoOp context"),
        (("OPTIM.WARMUP_EPOCH", "1"), "set OPTIM.WARMUP_EPOCH 0"),
    ]:
        result = run.run(run.command(run.test_dir, "--eval-only", options=(*TTT_OPTIONS, *options)), run.test_dir)
        assert result.returncode == 2 and "Traceback" not in result.output, result.output[-2000:]
        assert message in result.output, (message, result.output[-2000:])
