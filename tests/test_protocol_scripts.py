"""scripts/rada/*.sh with a stub `python` first on PATH: the exact train.py command lines and the errors.

Each test copies the scripts into a fake repository (configs written here, no train.py needed), so
the tests do not depend on which configs the rest of the project ships.
"""
import os
import subprocess

import pytest

from tests.fake_repo import REPO, finish, make_fake_repo, run_script, run_shell, train_py
from tests.run_logs import dassl_log, load_parse_results, rada_log, unfinished_log

DATASETS = ("caltech101", "dtd", "imagenet", "imagenet_a")
TRAINER_CONFIGS = {
    "RAdaCoOp": ("vit_b16_ep50_ctxv1", "vit_b16_ep50_ctxv1_long"),
    "MaPLe": ("vit_b16_c2_ep5_batch4_2ctx", "vit_b16_c2_ep5_batch4_2ctx_cross_datasets"),
    "ZeroshotCLIP": ("vit_b16",),
}
B2N = "output/base2new"
RADA_CFG = "RAdaCoOp/vit_b16_ep50_ctxv1"
parse_results = load_parse_results()


@pytest.fixture
def repo(tmp_path):
    return make_fake_repo(tmp_path, DATASETS, TRAINER_CONFIGS)


# ---- the command lines -------------------------------------------------------------------------

def test_base2new_train_command_and_yacs_pass_through(repo):
    result, argv = run_script(repo, "base2new_train.sh", "caltech101", 1, "OPTIM.MAX_EPOCH", 2, "TRAINER.RADA.TEMP", 0.5)
    assert result.returncode == 0, result.stderr
    out_dir = f"./{B2N}/train_base/caltech101/shots_16/{RADA_CFG}/seed1"
    assert argv == train_py(1, "RAdaCoOp", "caltech101", "vit_b16_ep50_ctxv1", out_dir) + [
        "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "2", "TRAINER.RADA.TEMP", "0.5"]
    assert f"+ python {' '.join(argv)}" in result.stdout.splitlines()  # echoed before running


def test_base2new_test_loads_the_trained_model(repo):
    train_dir = f"./{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed2"
    finish(repo, train_dir, rada_log(80.0, subsample="base", seed=2))
    result, argv = run_script(repo, "base2new_test.sh", "dtd", 2, "TEST.FINAL_MODEL", "last_step")
    assert result.returncode == 0, result.stderr
    assert argv == train_py(2, "RAdaCoOp", "dtd", "vit_b16_ep50_ctxv1", f"./{B2N}/test_new/dtd/shots_16/{RADA_CFG}/seed2") + [
        "--eval-only", "--model-dir", train_dir,
        "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "new", "TEST.FINAL_MODEL", "last_step"]

    _, pinned = run_script(repo, "base2new_test.sh", "dtd", 2, LOADEP="3")
    assert pinned[pinned.index("--model-dir") + 2:][:2] == ["--load-epoch", "3"]


def test_environment_overrides(repo, tmp_path):
    data = tmp_path / "datasets"
    data.mkdir()
    _, argv = run_script(repo, "base2new_train.sh", "dtd", 3, TRAINER="MaPLe", SHOTS="4", OUTPUT="runs", DATA=str(data))
    assert argv == train_py(3, "MaPLe", "dtd", "vit_b16_c2_ep5_batch4_2ctx",
                            "runs/base2new/train_base/dtd/shots_4/MaPLe/vit_b16_c2_ep5_batch4_2ctx/seed3",
                            root=str(data)) + ["DATASET.NUM_SHOTS", "4", "DATASET.SUBSAMPLE_CLASSES", "base"]

    _, argv = run_script(repo, "fewshot.sh", "dtd", 1, CFG="vit_b16_ep50_ctxv1_long")
    assert argv[argv.index("--config-file") + 1] == "configs/trainers/RAdaCoOp/vit_b16_ep50_ctxv1_long.yaml"
    assert argv[argv.index("--output-dir") + 1] == "./output/fewshot/dtd/shots_16/RAdaCoOp/vit_b16_ep50_ctxv1_long/seed1"


def test_fewshot_uses_all_classes(repo):
    _, argv = run_script(repo, "fewshot.sh", "caltech101", 2, SHOTS="1")
    assert argv == train_py(2, "RAdaCoOp", "caltech101", "vit_b16_ep50_ctxv1",
                            f"./output/fewshot/caltech101/shots_1/{RADA_CFG}/seed2") + ["DATASET.NUM_SHOTS", "1"]


def test_cross_dataset_train_and_test(repo):
    cross_cfg = "MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets"
    result, argv = run_script(repo, "xd_train.sh", 1, TRAINER="MaPLe")
    assert result.returncode == 0, result.stderr
    train_dir = f"./output/xd/train/imagenet/shots_16/{cross_cfg}/seed1"
    assert argv == train_py(1, "MaPLe", "imagenet", "vit_b16_c2_ep5_batch4_2ctx_cross_datasets", train_dir) + [
        "DATASET.NUM_SHOTS", "16"]

    finish(repo, train_dir, rada_log(70.0, subsample="all", trainer="MaPLe"))
    result, argv = run_script(repo, "xd_test.sh", "imagenet_a", 1, "DATALOADER.TEST.BATCH_SIZE", 50, TRAINER="MaPLe")
    assert result.returncode == 0, result.stderr
    assert argv == train_py(1, "MaPLe", "imagenet_a", "vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                            f"./output/xd/test/imagenet_a/shots_16/{cross_cfg}/seed1") + [
        "--eval-only", "--model-dir", train_dir, "DATALOADER.TEST.BATCH_SIZE", "50"]


def test_training_free_trainer_only_evaluates(repo):
    _, argv = run_script(repo, "base2new_train.sh", "dtd", 1, TRAINER="ZeroshotCLIP")
    assert argv[argv.index("--output-dir") + 2:] == [
        "--eval-only", "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base"]
    result, argv = run_script(repo, "base2new_test.sh", "dtd", 1, TRAINER="ZeroshotCLIP")  # no training needed
    assert result.returncode == 0, result.stderr
    assert "--model-dir" not in argv and "--eval-only" in argv


def test_from_another_directory_paths_are_absolute(repo, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert argv[0] == f"{repo}/train.py"
    assert argv[argv.index("--dataset-config-file") + 1] == f"{repo}/configs/datasets/dtd.yaml"
    assert argv[argv.index("--root") + 1] == "./data"  # DATA and OUTPUT stay relative to where you are


# ---- finished, unfinished and missing runs -----------------------------------------------------

def test_finished_train_run_is_skipped_and_unfinished_one_rerun(repo):
    run_dir = f"{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed1"
    finish(repo, run_dir, rada_log(80.0))
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1)
    assert result.returncode == 0 and argv is None
    assert "already holds a finished run" in result.stdout

    finish(repo, run_dir, unfinished_log(stop_epoch=2, epochs=5, stop_batch=7, batches=40))
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1)
    assert argv is not None
    assert "unfinished run" in result.stdout and "epoch [2/5] batch [7/40]" in result.stdout


def test_test_before_train_names_the_missing_dir_and_the_command(repo):
    result, argv = run_script(repo, "base2new_test.sh", "caltech101", 1, SHOTS="8")
    assert result.returncode == 1 and argv is None
    assert f"./{B2N}/train_base/caltech101/shots_8/{RADA_CFG}/seed1 does not exist" in result.stderr
    assert ("TRAINER=RAdaCoOp CFG=vit_b16_ep50_ctxv1 SHOTS=8 bash scripts/rada/base2new_train.sh caltech101 1"
            in result.stderr)

    result, argv = run_script(repo, "xd_test.sh", "imagenet_a", 2)
    assert result.returncode == 1 and argv is None
    assert "bash scripts/rada/xd_train.sh 2" in result.stderr


def test_test_refuses_an_unfinished_training(repo):
    finish(repo, f"{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed1", unfinished_log(stop_epoch=3, stop_batch=20))
    result, argv = run_script(repo, "base2new_test.sh", "dtd", 1)
    assert result.returncode == 1 and argv is None
    assert "unfinished (log reached: epoch [3/5] batch [20/40])" in result.stderr


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script, args, env, message", [
    ("base2new_train.sh", ["foo", 1], {},
     "unknown dataset 'foo': there is no configs/datasets/foo.yaml. Available datasets: caltech101 dtd imagenet imagenet_a"),
    ("xd_test.sh", ["imagenet-r", 1], {}, "unknown dataset 'imagenet-r'"),
    ("fewshot.sh", ["dtd", 1], {"TRAINER": "NoSuchTrainer"},
     "unknown trainer 'NoSuchTrainer' and no CFG given. Known trainers: ZeroshotCLIP CoOp RAdaCoOp RAda MaPLe RAdaMaPLe"),
    ("base2new_train.sh", ["dtd", 1], {"TRAINER": "FT"}, "no folder configs/trainers/FT/"),
    ("base2new_train.sh", ["dtd", 1], {"CFG": "vit_b32"},
     "no trainer config configs/trainers/RAdaCoOp/vit_b32.yaml. Available for RAdaCoOp: vit_b16_ep50_ctxv1 vit_b16_ep50_ctxv1_long"),
    ("base2new_train.sh", ["dtd", 0], {}, "SEED must be a positive integer, got '0'"),
    ("base2new_train.sh", ["dtd", 1], {"SHOTS": "many"}, "SHOTS must be a positive integer, got 'many'"),
    ("base2new_test.sh", ["dtd", 1], {"LOADEP": "last"}, "LOADEP must be a positive integer, got 'last'"),
    ("base2new_train.sh", ["dtd", 1, "OPTIM.LR"], {},
     "arguments after the required ones are yacs options and come in KEY VALUE pairs; got 1 word(s): OPTIM.LR"),
    ("base2new_train.sh", ["dtd"], {}, "missing arguments: expected DATASET SEED, got 1 argument(s)"),
    ("xd_train.sh", [], {}, "missing arguments: expected SEED, got 0 argument(s)"),
    ("fewshot.sh", ["dtd", 1], {"DATA": "/no/such/folder"}, "dataset root '/no/such/folder' does not exist"),
])
def test_bad_input_is_named(repo, script, args, env, message):
    result, argv = run_script(repo, script, *args, **env)
    assert result.returncode == 1
    assert argv is None
    assert f"error: {message}" in result.stderr


def test_help_prints_the_usage(repo):
    result, argv = run_script(repo, "xd_test.sh", "--help")
    assert result.returncode == 0 and argv is None
    assert "bash scripts/rada/xd_test.sh DATASET SEED [KEY VALUE ...]" in result.stdout


# ---- the scripts and parse_results.py agree on what a finished run is --------------------------

@pytest.mark.parametrize("log_text, finished", [
    (rada_log(80.0), True),
    (rada_log(80.0, train=False), True),
    (dassl_log(80.0, finish_line="Finished training"), True),
    (dassl_log(80.0, train=False, evaluate_line=False), True),
    (rada_log(80.0, split="val", train=False), False),
    (unfinished_log(val_accuracy=70.0), False),
    (unfinished_log(stop_epoch=5, stop_batch=None, batches=4) + "Finish training\n", False),
    ("", False),
])
def test_scripts_and_parser_agree_on_finished_runs(tmp_path, log_text, finished):
    (tmp_path / "log.txt").write_text(log_text)
    check = subprocess.run(["bash", "-c", 'source "$1" && run_finished "$2"', "-",
                            str(REPO / "scripts" / "rada" / "common.sh"), str(tmp_path)],
                           env={**os.environ, "RADA_SKIP_SETUP": "1"}, capture_output=True, text=True, timeout=60)
    assert (check.returncode == 0) is finished, check.stderr
    assert (parse_results.parse_log(tmp_path / "log.txt").accuracy is not None) is finished


# ---- resumed runs and changed settings ---------------------------------------------------------

def test_a_killed_and_resumed_run_is_finished(repo):
    # Dassl's logger writes the resumed process to log.txt-<timestamp>, beside the killed one's log.txt.
    run_dir = f"{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed1"
    finish(repo, run_dir, unfinished_log(stop_epoch=2, stop_batch=7))
    (repo / run_dir / "log.txt-2026-12-01-10-00-00").write_text(rada_log(80.0))
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1)
    assert result.returncode == 0 and argv is None
    assert "already holds a finished run" in result.stdout
    result, argv = run_script(repo, "base2new_test.sh", "dtd", 1)
    assert result.returncode == 0 and argv is not None  # the test script accepts the training run
    assert parse_results.read_run(repo / run_dir).accuracy == 80.0


def test_changed_settings_stop_the_script_and_force_runs_again(repo, monkeypatch):
    from trainers.runs.results import write_run_record

    run_dir = f"{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed1"
    _, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2)
    finish(repo, run_dir, rada_log(80.0))
    monkeypatch.chdir(repo)  # train.py records its command line from where the script ran it
    write_run_record(repo / run_dir, argv[1:], {})

    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2)
    assert result.returncode == 0 and argv is None and "already holds a finished run" in result.stdout

    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 5, "TRAINER.RADA.ALPHA", 0.1)
    assert result.returncode == 1 and argv is None
    assert "holds a finished run made with other settings" in result.stderr
    assert "OPTIM.MAX_EPOCH: was 2, now 5" in result.stderr and "TRAINER.RADA.ALPHA: was unset, now 0.1" in result.stderr
    assert "new OUTPUT or CFG name" in result.stderr and "FORCE=1" in result.stderr

    (repo / "configs/trainers/RAdaCoOp/vit_b16_ep50_ctxv1.yaml").write_text("OPTIM:\n  MAX_EPOCH: 3\n")
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2)
    assert result.returncode == 1 and "--config-file (the file's content changed)" in result.stderr

    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 5, FORCE="1")
    assert result.returncode == 0 and argv is not None
    assert f"FORCE=1: deleting ./{run_dir}" in result.stdout and not (repo / run_dir).exists()


# ---- several processes (GPUS > 1): torchrun before train.py ----------------------------------------

TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def test_two_process_runs_are_skipped_resumed_and_checked_by_their_train_py_arguments(repo, monkeypatch):
    from trainers.runs.results import write_run_record

    run_dir = f"{B2N}/train_base/dtd/shots_16/{RADA_CFG}/seed1"
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2, GPUS="2")
    assert result.returncode == 0, result.stderr
    train_argv = train_py(1, "RAdaCoOp", "dtd", "vit_b16_ep50_ctxv1", f"./{run_dir}") + [
        "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "2"]
    assert argv == TORCHRUN + train_argv
    finish(repo, run_dir, unfinished_log(stop_epoch=2, stop_batch=7))
    monkeypatch.chdir(repo)  # what train.py records under torchrun: its own arguments, from where the script ran
    write_run_record(repo / run_dir, train_argv[1:], {})
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2, GPUS="2")
    assert result.returncode == 0 and argv == TORCHRUN + train_argv, result.stderr
    assert "unfinished run" in result.stdout

    finish(repo, run_dir, rada_log(80.0))
    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 2, GPUS="2")
    assert result.returncode == 0 and argv is None, result.stderr
    assert "already holds a finished run" in result.stdout

    result, argv = run_script(repo, "base2new_train.sh", "dtd", 1, "OPTIM.MAX_EPOCH", 5, GPUS="2")
    assert result.returncode == 1 and argv is None
    assert "(OPTIM.MAX_EPOCH: was 2, now 5)" in result.stderr  # the one change, nothing shifted


def test_hints_rerun_the_whole_command(repo, tmp_path):
    data = tmp_path / "datasets"
    data.mkdir()
    env = dict(DATA=str(data), OUTPUT="runs", SHOTS="4", CFG="vit_b16_ep50_ctxv1_long", GPUS="2",
               TORCHRUN_ARGS="--standalone --max-restarts 0")
    options = ["OPTIM.MAX_EPOCH", "2", "MODEL.BACKBONE.NAME", "my clip.pt"]
    _, expected = run_script(repo, "base2new_train.sh", "dtd", 1, *options, **env)
    train_dir = "runs/base2new/train_base/dtd/shots_4/RAdaCoOp/vit_b16_ep50_ctxv1_long/seed1"
    assert expected[expected.index("--output-dir") + 1] == train_dir

    for first, log_text in (("Train it first with: ", None), ("Finish it first with: ", unfinished_log())):
        if log_text is not None:
            finish(repo, train_dir, log_text)
        result, argv = run_script(repo, "base2new_test.sh", "dtd", 1, *options, **env)
        assert result.returncode == 1 and argv is None
        hint = result.stderr.split(first, 1)[1].strip()
        assert "GPUS=2" in hint and "OPTIM.MAX_EPOCH 2 MODEL.BACKBONE.NAME 'my clip.pt'" in hint
        result, argv = run_shell(repo, hint)  # in a shell without the variables of the first command
        assert result.returncode == 0, result.stderr
        assert argv == expected
