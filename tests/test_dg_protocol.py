"""The full fine-tuning protocol (dg): scripts/rada/dg_train.sh and dg_test.sh with a stub `python`,
and its table in scripts/parse_results.py."""

import subprocess
import sys

import pytest

from tests.fake_repo import REPO, finish, make_fake_repo, run_script, train_py
from tests.run_logs import load_parse_results, rada_log, write_run

SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet")
DG_CFG = "vit_b16_ep10_batch512"
parse_results = load_parse_results()


@pytest.fixture
def repo(tmp_path):
    trainers = {trainer: ("vit_b16_ep10", DG_CFG) for trainer in ("FT", "FLYP", "RAdaFT")}
    return make_fake_repo(tmp_path, ("imagenet", *SHIFTS), trainers)


def test_train_on_all_of_imagenet_then_evaluate_each_shift(repo):
    result, argv = run_script(repo, "dg_train.sh", 2, "OPTIM.MAX_EPOCH", 5)
    assert result.returncode == 0, result.stderr
    train_dir = f"./output/dg/train/imagenet/shots_all/RAdaFT/{DG_CFG}/seed2"
    assert argv == train_py(2, "RAdaFT", "imagenet", DG_CFG, train_dir) + ["DATASET.NUM_SHOTS", "-1", "OPTIM.MAX_EPOCH", "5"]

    result, argv = run_script(repo, "dg_test.sh", "objectnet", 2)
    assert result.returncode == 1 and argv is None
    assert f"no trained model: {train_dir} does not exist. Train it first with:" in result.stderr

    finish(repo, train_dir, rada_log(80.0, subsample="all", seed=2, trainer="RAdaFT", shots=-1))
    result, argv = run_script(repo, "dg_test.sh", "objectnet", 2, LOADEP="10")
    assert result.returncode == 0, result.stderr
    assert argv == train_py(2, "RAdaFT", "objectnet", DG_CFG, f"./output/dg/test/objectnet/shots_all/RAdaFT/{DG_CFG}/seed2") + [
        "--eval-only", "--model-dir", train_dir, "--load-epoch", "10"]


def test_baselines_shots_and_base_to_new_config(repo):
    _, argv = run_script(repo, "dg_train.sh", 1, TRAINER="FLYP", SHOTS="16")
    assert argv == train_py(1, "FLYP", "imagenet", DG_CFG, f"./output/dg/train/imagenet/shots_16/FLYP/{DG_CFG}/seed1") + [
        "DATASET.NUM_SHOTS", "16"]
    _, argv = run_script(repo, "base2new_train.sh", "imagenet", 1, TRAINER="FT")  # the 16-shot config
    assert argv[argv.index("--config-file") + 1] == "configs/trainers/FT/vit_b16_ep10.yaml"


def write_dg(root, trainer, imagenet, shifts, seeds=(1, 2, 3)):
    for seed in seeds:
        folder = {"trainer": trainer, "cfg": DG_CFG, "shots": "all"}
        write_run(root, "dg/train", "imagenet", seed,
                  rada_log(imagenet + seed - 2, subsample="all", seed=seed, trainer=trainer, shots=-1), **folder)
        for dataset, accuracy in shifts.items():
            write_run(root, "dg/test", dataset, seed,
                      rada_log(accuracy + seed - 2, subsample="all", seed=seed, trainer=trainer, shots=-1, train=False),
                      **folder)


def rows(stdout):
    """{first cell: cells} of the markdown table rows."""
    table = {}
    for line in stdout.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            table[cells[0]] = cells
    return table


def run_parser(*args):
    script = REPO / "scripts" / "parse_results.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_table_has_imagenet_each_shift_and_their_mean(tmp_path):
    shifts = dict(zip(SHIFTS, (73.0, 71.0, 48.0, 50.0, 58.0), strict=False))
    write_dg(tmp_path, "RAdaFT", 82.0, shifts)
    result = run_parser(tmp_path, "--protocol", "dg")
    assert result.returncode == 0, result.stderr
    assert f"== dg | trainer RAdaFT | config {DG_CFG} | all training images | seeds 1 2 3 ==" in result.stdout
    table = rows(result.stdout)
    assert table["ImageNet (in distribution, from the training run)"][1:] == ["3", "82.00 +- 0.82"]
    labels = [label for label in table if label in ("ImageNetV2", "ImageNet-R", "ImageNet-A", "ImageNet-Sketch", "ObjectNet")]
    assert labels == ["ImageNetV2", "ImageNet-R", "ImageNet-A", "ImageNet-Sketch", "ObjectNet"]  # FLYP's order
    assert table["ObjectNet"][2] == "58.00 +- 0.82"
    assert table["Mean of the 5 shifts"][2] == "60.00"
    assert "| RAda-FT  | 81.4" in result.stdout and "FLYP" in result.stdout  # the published reference


def test_partial_runs_give_a_partial_mean_and_the_commands_to_finish(tmp_path):
    write_dg(tmp_path, "FT", 81.0, dict(zip(SHIFTS[:4], (73.0, 71.0, 48.0, 50.0), strict=False)))
    result = run_parser(tmp_path)
    table = rows(result.stdout)
    assert "Mean of the 5 shifts" not in table and table["Mean of the shifts present (4 of 5)"][2] == "60.50"
    assert "Not run: objectnet" in result.stdout

    write_run(tmp_path, "dg/test", "objectnet", 1, rada_log(58.0, subsample="all", trainer="FT", shots=-1, train=False),
              trainer="FT", cfg=DG_CFG, shots="all")
    result = run_parser(tmp_path)
    assert "Mean of the 5 shifts" in rows(result.stdout)
    assert (f"dg_test objectnet seed 2: run OUTPUT={tmp_path} TRAINER=FT CFG={DG_CFG} SHOTS=all "
            "bash scripts/rada/dg_test.sh objectnet 2") in result.stdout
