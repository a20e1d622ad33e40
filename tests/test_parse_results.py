"""scripts/parse_results.py on fake output trees: numbers, reports, exit status."""
import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_logs import (
    CFG,
    TRAINER,
    dassl_log,
    load_parse_results,
    rada_log,
    unfinished_log,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "parse_results.py"

parse_results = load_parse_results()

PUBLISHED = parse_results.load_published()
OFFSETS = (-0.6, 0.0, 0.6)  # seeds 1, 2, 3 around the mean: population std = 0.4899


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def table_row(stdout, label):
    """The cells of the markdown table row whose first cell is `label`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in:\n{stdout}")


def write_base2new(root, dataset, base, new, seeds=(1, 2, 3), trainer=TRAINER, cfg=CFG, shots=16):
    """Finished train_base and test_new runs with accuracies mean + offset per seed."""
    folder = {"trainer": trainer, "cfg": cfg, "shots": shots}
    for seed in seeds:
        offset = OFFSETS[seed - 1]
        write_run(root, "base2new/train_base", dataset, seed,
                  rada_log(base + offset, subsample="base", seed=seed, trainer=trainer, shots=shots), **folder)
        write_run(root, "base2new/test_new", dataset, seed,
                  rada_log(new + offset, subsample="new", seed=seed, trainer=trainer, shots=shots, train=False),
                  **folder)


def write_clip_benchmark(root):
    """All 11 datasets whose seed means are CLIP's published per-dataset numbers."""
    for dataset in parse_results.BENCHMARK:
        published = PUBLISHED[(dataset, "CLIP")]
        write_base2new(root, dataset, published.base, published.new)


# ---- reading one log ---------------------------------------------------------------------------

def test_our_result_line_gives_two_decimals_and_metadata(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(rada_log(95.126, subsample="new", seed=2))
    result = parse_results.parse_log(log)
    assert result.accuracy == 95.13  # not Dassl's one-decimal 95.1 printed just above it
    assert not result.from_dassl_line
    assert result.fields["subsample"] == "new" and result.fields["seed"] == "2"


@pytest.mark.parametrize("finish_line", ["Finish training", "Finished training"])
def test_dassl_logs_of_other_tools_are_read_after_either_end_signal(tmp_path, finish_line):
    # MaPLe's parse_test_res.py waits for `Finished training`, which Dassl >= 0.6.1 no longer prints
    # ("Nothing found", MaPLe#89); both spellings must work.
    log = tmp_path / "log.txt"
    log.write_text(dassl_log(81.3, finish_line=finish_line))
    result = parse_results.parse_log(log)
    assert result.accuracy == 81.3 and result.from_dassl_line


def test_eval_only_dassl_log_without_evaluate_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(dassl_log(70.2, train=False, evaluate_line=False))
    assert parse_results.parse_log(log).accuracy == 70.2


def test_unfinished_training_with_validation_blocks_is_not_a_result(tmp_path):
    # best_val runs print `* accuracy:` after every epoch; those are validation numbers.
    log = tmp_path / "log.txt"
    log.write_text(unfinished_log(stop_epoch=3, epochs=5, stop_batch=20, batches=40, val_accuracy=88.0))
    result = parse_results.parse_log(log)
    assert result.accuracy is None
    assert result.progress == "stopped at epoch 3/5, batch 20/40"


def test_validation_lines_do_not_count_as_test_results(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(rada_log(90.0, split="val", train=False))
    result = parse_results.parse_log(log)
    assert result.accuracy is None
    assert "last line" in result.progress


def test_training_finished_without_test_result(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(unfinished_log(stop_epoch=5, epochs=5, stop_batch=None, batches=4) + "Finish training\n")
    assert parse_results.parse_log(log).progress == "training finished but the log has no test result"


def test_last_test_result_wins(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(rada_log(50.0, train=False) + rada_log(60.5, train=False))
    assert parse_results.parse_log(log).accuracy == 60.5


# ---- statistics --------------------------------------------------------------------------------

def test_summarise_uses_population_std_and_ci95():
    values = [80.0, 82.0, 87.0]
    stat = parse_results.summarise(values)
    assert stat.mean == pytest.approx(83.0) and stat.n == 3
    assert stat.spread == pytest.approx(math.sqrt(((-3) ** 2 + (-1) ** 2 + 4 ** 2) / 3))
    ci = parse_results.summarise(values, ci95=True)
    assert ci.spread == pytest.approx(1.96 * stat.spread / math.sqrt(3))
    assert parse_results.summarise([]) is None


def test_harmonic_mean_reproduces_the_papers_average():
    assert round(parse_results.harmonic_mean(69.34, 74.22), 2) == 71.70
    assert round(parse_results.harmonic_mean(82.28, 75.14), 2) == 78.55


# ---- whole trees -------------------------------------------------------------------------------

def test_full_base2new_tree_matches_the_papers_convention(tmp_path):
    write_clip_benchmark(tmp_path)
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    dtd = table_row(out, "DTD")
    assert dtd[1] == "3/3"
    assert dtd[2] == "53.24 +- 0.49" and dtd[3] == "59.90 +- 0.49"
    assert dtd[4] == f"{parse_results.harmonic_mean(53.24, 59.90):.2f}" == "56.37"
    assert dtd[5] == "53.24 / 59.90 / 56.37"  # CLIP's published column beside ours

    # The average: means of the 11 base and new means, HM of those (not the mean of the HMs).
    average = table_row(out, "Average (11 datasets)")
    assert average[2:5] == ["69.34", "74.22", "71.70"]
    assert average[5:10] == ["69.34 / 74.22 / 71.70", "82.69 / 63.22 / 71.66", "80.47 / 71.69 / 75.83",
                             "82.28 / 75.14 / 78.55", "84.26 / 76.10 / 79.97"]
    assert "Missing runs" not in out and "Unfinished" not in out and "Not run" not in out
    published = table_row(out, "RAda + Adapter")
    assert published[1:4] == ["84.32", "76.25", "80.08"] and "unconfirmed" not in out


def test_partial_tree_averages_only_what_is_present_and_says_so(tmp_path):
    write_base2new(tmp_path, "caltech101", 95.0, 93.0)
    write_base2new(tmp_path, "eurosat", 90.0, 70.0)
    out = run_cli(tmp_path).stdout
    average = table_row(out, "Average of the datasets present (2 of 11)")
    assert average[2:5] == ["92.50", "81.50", f"{parse_results.harmonic_mean(92.5, 81.5):.2f}"]
    # CLIP's column averaged over the same two datasets, for a like-for-like comparison.
    clip_base, clip_new = (96.84 + 56.48) / 2, (94.00 + 64.05) / 2
    assert average[5] == f"{clip_base:.2f} / {clip_new:.2f} / {parse_results.harmonic_mean(clip_base, clip_new):.2f}"
    assert "Average (11 datasets)" not in out
    assert "Not run: imagenet oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd ucf101" in out


def test_missing_unfinished_and_fallback_runs_are_reported(tmp_path):
    write_base2new(tmp_path, "dtd", 80.0, 55.0, seeds=(1, 2))
    write_run(tmp_path, "base2new/train_base", "dtd", 3, unfinished_log(stop_epoch=3, epochs=5, stop_batch=20, batches=40))
    write_run(tmp_path, "base2new/train_base", "eurosat", 1, dassl_log(91.3))
    write_run(tmp_path, "base2new/test_new", "eurosat", 1, None)  # folder without log.txt

    result = run_cli(tmp_path, "--csv", tmp_path / "table.csv")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    dtd = table_row(out, "DTD")
    assert dtd[1] == "2/2" and dtd[2] == "79.70 +- 0.30" and dtd[3] == "54.70 +- 0.30"
    eurosat = table_row(out, "EuroSAT")
    assert eurosat[1:5] == ["1/0", "91.30", "-", "-"]

    unfinished_dtd = tmp_path / "base2new/train_base/dtd/shots_16" / TRAINER / CFG / "seed3"
    assert f"{unfinished_dtd}: stopped at epoch 3/5, batch 20/40" in out
    assert "Unfinished runs (still running, stopped or crashed): 2" in out
    assert "no log.txt" in out
    command = f"OUTPUT={tmp_path} TRAINER={TRAINER} CFG={CFG} SHOTS=16 bash scripts/rada/"
    assert f"test_new dtd seed 3: run {command}base2new_test.sh dtd 3" in out
    assert f"train_base eurosat seed 2: run {command}base2new_train.sh eurosat 2" in out
    assert "test_new eurosat seed 1: run" not in out  # present (without log), reported as unfinished instead
    assert "Missing runs: 5" in out  # dtd new 3, eurosat base 2 3, eurosat new 2 3
    assert "one-decimal `* accuracy:` line" in out
    assert str(tmp_path / "base2new/train_base/eurosat/shots_16" / TRAINER / CFG / "seed1") in out

    with open(tmp_path / "table.csv", newline="") as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert float(rows["DTD"]["base_mean"]) == pytest.approx(79.7) and rows["DTD"]["base_seeds"] == "2"
    assert float(rows["DTD"]["base_std"]) == pytest.approx(0.3)
    assert float(rows["DTD"]["hm"]) == pytest.approx(parse_results.harmonic_mean(79.7, 54.7), abs=1e-4)
    assert rows["EuroSAT"]["new_mean"] == "" and rows["EuroSAT"]["hm"] == ""


def test_log_that_contradicts_its_folder_is_rejected(tmp_path):
    write_base2new(tmp_path, "dtd", 80.0, 55.0)
    # A base-class evaluation copied into the new-class folder must not count as "new".
    write_run(tmp_path, "base2new/test_new", "dtd", 3, rada_log(99.0, subsample="base", seed=3, train=False))
    out = run_cli(tmp_path).stdout
    assert table_row(out, "DTD")[1:4] == ["3/2", "80.00 +- 0.49", "54.70 +- 0.30"]
    assert "its log reports subsample=base (folder says new)" in out


def test_seeds_option_and_ci95(tmp_path):
    write_base2new(tmp_path, "dtd", 80.0, 55.0)
    write_run(tmp_path, "base2new/train_base", "dtd", 4, rada_log(10.0, seed=4))
    out = run_cli(tmp_path, "--seeds", "1", "3", "--ci95").stdout
    dtd = table_row(out, "DTD")
    half_width = 1.96 * statistics.pstdev([79.4, 80.6]) / math.sqrt(2)
    assert dtd[1] == "2/2" and dtd[2] == f"80.00 +- {half_width:.2f}"
    assert "base (mean +- 95% CI)" in out
    assert "Seed folders outside --seeds (not counted): 3" in out  # seed 2 (both parts) and seed 4
    assert "Missing runs" not in out


def test_fewshot_and_cross_dataset_tables(tmp_path):
    for seed, accuracy in zip((1, 2, 3), (93.0, 94.0, 95.0), strict=False):
        write_run(tmp_path, "fewshot", "caltech101", seed, rada_log(accuracy, subsample="all", seed=seed))
        write_run(tmp_path, "xd/train", "imagenet", seed, rada_log(accuracy - 20, subsample="all", seed=seed))
        for target, delta in zip(parse_results.DG_TARGETS, (-10, -25, -40, -15), strict=False):
            write_run(tmp_path, "xd/test", target, seed,
                      rada_log(accuracy - 20 + delta, subsample="all", seed=seed, train=False))
    write_run(tmp_path, "xd/test", "dtd", 1, rada_log(45.0, subsample="all", train=False))

    out = run_cli(tmp_path).stdout
    assert table_row(out, "Caltech101")[1:] == ["3", "94.00 +- 0.82"]
    assert table_row(out, "ImageNet (source, from the training run)")[1:] == ["3", "74.00 +- 0.82"]
    assert table_row(out, "ImageNet-Sketch")[2] == "49.00 +- 0.82"
    assert table_row(out, "Domain generalisation average (4 targets)")[2] == f"{74 - 90 / 4:.2f}"
    assert "Cross-dataset average" not in out  # one target is not an average
    assert "xd_test dtd seed 2: run" in out
    assert "published base-to-new averages" not in out  # no published columns without sources


def test_protocol_folder_and_protocol_filter(tmp_path):
    write_base2new(tmp_path, "dtd", 80.0, 55.0)
    write_run(tmp_path, "fewshot", "dtd", 1, rada_log(70.0, subsample="all"))
    only_fewshot = run_cli(tmp_path, "--protocol", "fewshot").stdout
    assert "== fewshot" in only_fewshot and "== base2new" not in only_fewshot
    from_folder = run_cli(tmp_path / "base2new")
    assert from_folder.returncode == 0
    assert "== base2new" in from_folder.stdout and "== fewshot" not in from_folder.stdout


def test_runs_are_grouped_by_trainer_cfg_and_shots(tmp_path, capsys):
    write_base2new(tmp_path, "dtd", 80.0, 55.0)
    write_base2new(tmp_path, "dtd", 70.0, 50.0, trainer="MaPLe", cfg="vit_b16_c2_ep5_batch4_2ctx", shots=4)
    runs, _ = parse_results.discover_runs(tmp_path, ["base2new"])
    assert {run.group for run in runs} == {("base2new", TRAINER, CFG, 16),
                                          ("base2new", "MaPLe", "vit_b16_c2_ep5_batch4_2ctx", 4)}
    assert parse_results.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    maple = out.index("== base2new | trainer MaPLe | config vit_b16_c2_ep5_batch4_2ctx | 4 shots")
    rada = out.index(f"== base2new | trainer {TRAINER} | config {CFG} | 16 shots")
    assert table_row(out[maple:], "DTD")[2] == "70.00 +- 0.49"
    assert table_row(out[rada:], "DTD")[2] == "80.00 +- 0.49"


# ---- failures ----------------------------------------------------------------------------------

def test_empty_tree_fails_with_a_clear_message(tmp_path):
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert "no run folder found under" in result.stderr and "seed<S>/log.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_tree_with_only_unfinished_runs_fails(tmp_path):
    write_run(tmp_path, "base2new/train_base", "dtd", 1, unfinished_log())
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert "none of the 1 run folder(s)" in result.stderr
    assert "stopped at epoch 3/5" in result.stdout  # the report still says how far it got


def test_missing_output_dir_and_conflicting_protocol(tmp_path):
    missing = run_cli(tmp_path / "nope")
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "xd").mkdir()
    conflict = run_cli(tmp_path / "xd", "--protocol", "fewshot")
    assert conflict.returncode == 1 and "--protocol fewshot" in conflict.stderr


def test_malformed_published_file_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,method,base,new,hm,source\ndtd,CLIP,53.24,oops,56.37,paper\n")
    with pytest.raises(parse_results.ResultsError) as error:
        parse_results.load_published(bad)
    assert "line 2" in str(error.value) and str(bad) in str(error.value)


def test_unwritable_csv_path(tmp_path):
    write_base2new(tmp_path, "dtd", 80.0, 55.0)
    result = run_cli(tmp_path, "--csv", tmp_path / "no" / "such" / "dir.csv")
    assert result.returncode == 1 and "cannot write the CSV file" in result.stderr
