"""Results as records: results.jsonl in a run folder, one JSON object per evaluation, read by
trainers.runs.results (the run's state), scripts/parse_results.py (tables of any metric) and the scripts."""
import csv
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_dassl
from tests.run_logs import (
    CFG,
    TRAINER,
    load_parse_results,
    rada_log,
    record_drawn_charts,
    unfinished_log,
    write_record_run,
    write_run,
)
from tests.train_harness import TrainRun
from trainers.runs.results import (
    RECORDS_NAME,
    RUN,
    SKIP,
    ResultsError,
    append_record,
    check_run,
    evaluation_record,
    read_records,
    read_run,
    run_finished,
    write_run_record,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "run_077bb5f"
parse_results = load_parse_results()
METRICS = {"accuracy": 91.25, "error_rate": 8.75, "macro_f1": 90.5}
FIELDS = {"dataset": "DescribableTextures", "subsample": "base", "split": "test", "shots": 16, "seed": 2,
          "trainer": TRAINER, "backbone": "ViT-B/16"}
# Marks the end-to-end tests that pass once trainers/engine.py appends a record after every evaluation;
# strict, so that they fail (and this mark is removed) from then on.


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "parse_results.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def results_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainers.runs.results", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def table_row(stdout, label):
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in:\n{stdout}")


def record(run_dir, **changes):
    return evaluation_record(run_dir=run_dir, **{**FIELDS, "metrics": METRICS, "finished": True, **changes})


# ---- the record ------------------------------------------------------------------------------------

def test_a_record_carries_every_metric_the_result_fields_and_the_place_in_the_layout(tmp_path):
    run_dir = tmp_path / "base2new/train_base/dtd/shots_16" / TRAINER / CFG / "seed2"
    metrics = {**METRICS, "zero_shot_accuracy": 80.125}
    written = record(run_dir, metrics=metrics)
    assert written["metrics"] == metrics
    assert {key: written[key] for key in FIELDS} == FIELDS
    assert written["finished"] is True and written["config"] == CFG and written["protocol"] == "base2new"
    assert written["format"] == 1 and datetime.fromisoformat(written["time"]).tzinfo is not None
    assert json.loads(json.dumps(written)) == written  # plain JSON

    dg = record(tmp_path / "dg/test/objectnet/shots_all" / TRAINER / "vit_b16_fft" / "seed1", finished=False)
    assert dg["protocol"] == "dg" and dg["config"] == "vit_b16_fft" and dg["finished"] is False


def test_outside_the_layout_the_config_is_the_stem_of_the_config_file_in_run_json(tmp_path):
    assert record(tmp_path)["config"] == "" and record(tmp_path)["protocol"] == ""
    argv = ["--trainer", TRAINER, "--config-file", "configs/trainers/RAdaCoOp/vit_b16_ep50_ctxv1.yaml", "OPTIM.LR", "1"]
    write_run_record(tmp_path, argv, {})
    assert record(tmp_path)["config"] == "vit_b16_ep50_ctxv1" and record(tmp_path)["protocol"] == ""


def test_metrics_become_plain_numbers_and_one_is_needed(tmp_path):
    assert record(tmp_path, metrics={"accuracy": torch.tensor(50.5)})["metrics"] == {"accuracy": 50.5}
    with pytest.raises(ValueError, match="at least one metric"):
        record(tmp_path, metrics={})


# ---- the file --------------------------------------------------------------------------------------

def test_records_are_appended_one_line_each_and_read_back_in_order(tmp_path):
    assert read_records(tmp_path) == []
    first, second = record(tmp_path, split="val", finished=False), record(tmp_path)
    append_record(tmp_path, first)
    append_record(tmp_path, second)
    assert (tmp_path / RECORDS_NAME).read_text().count("\n") == 2
    assert read_records(tmp_path) == [first, second]


def test_a_torn_last_line_is_skipped_and_the_next_append_replaces_it(tmp_path):
    complete = record(tmp_path, split="val", finished=False)
    append_record(tmp_path, complete)
    line = json.dumps(record(tmp_path)) + "\n"
    with open(tmp_path / RECORDS_NAME, "a") as handle:
        handle.write(line[: len(line) // 2])  # a process killed in the middle of its write
    assert read_records(tmp_path) == [complete]
    assert not read_run(tmp_path).finished

    final = record(tmp_path)
    append_record(tmp_path, final)
    assert read_records(tmp_path) == [complete, final]
    assert read_run(tmp_path).finished


def test_a_garbled_middle_line_is_an_error_naming_the_file_the_line_and_the_fix(tmp_path):
    append_record(tmp_path, record(tmp_path))
    with open(tmp_path / RECORDS_NAME, "a") as handle:
        handle.write('{"split": "test", "finis\n')
    append_record(tmp_path, record(tmp_path))
    with pytest.raises(ResultsError) as error:
        read_records(tmp_path)
    message = str(error.value)
    assert f"{tmp_path / RECORDS_NAME}, line 2 is not an evaluation record" in message
    assert "delete that line" in message and "log.txt" in message

    (tmp_path / RECORDS_NAME).write_text(json.dumps({"split": "test"}) + "\n")
    with pytest.raises(ResultsError, match=r"line 1 .*no finished, metrics"):
        read_records(tmp_path)
    finished = results_cli("finished", tmp_path)  # the scripts stop on it instead of guessing
    assert finished.returncode == 2 and "line 1" in finished.stderr and "Traceback" not in finished.stderr


# ---- the run's state -------------------------------------------------------------------------------

def test_a_run_is_finished_by_a_final_test_record_and_its_metrics_are_the_result(tmp_path):
    (tmp_path / "log.txt").write_text(unfinished_log(stop_epoch=2, epochs=2, stop_batch=None, batches=4)
                                      + "Finish training\n")
    append_record(tmp_path, record(tmp_path, split="val", metrics={"accuracy": 70.0}, finished=False))
    append_record(tmp_path, record(tmp_path, metrics={"accuracy": 71.0}, finished=False))  # an intermediate test
    state = read_run(tmp_path)
    assert not state.finished and state.accuracy is None and not run_finished(tmp_path)
    assert state.progress == "training finished but the log has no test result"
    assert state.reached == "epoch [2/2] batch [4/4]"
    assert check_run(tmp_path, [])[0] == RUN

    append_record(tmp_path, record(tmp_path))
    state = read_run(tmp_path)
    assert state.finished and state.metrics == METRICS and state.accuracy == 91.25
    assert state.fields == {key: str(value) for key, value in FIELDS.items()}
    assert run_finished(tmp_path) and check_run(tmp_path, [])[0] == SKIP
    assert results_cli("finished", tmp_path).returncode == 0


def test_records_decide_over_the_result_line_of_the_log(tmp_path):
    (tmp_path / "log.txt").write_text(rada_log(60.0))  # printed with two decimals; the record keeps all
    append_record(tmp_path, record(tmp_path, metrics={"accuracy": 60.004}))
    assert read_run(tmp_path).accuracy == 60.004

    unrecorded = tmp_path / "unrecorded"  # killed after its result line, before its record
    unrecorded.mkdir()
    (unrecorded / "log.txt").write_text(rada_log(60.0))
    (unrecorded / RECORDS_NAME).write_text(json.dumps(record(unrecorded, split="val", finished=False)) + "\n")
    assert not run_finished(unrecorded)
    assert read_run(unrecorded).progress == "results.jsonl holds no final test evaluation"


def test_an_unfinished_run_with_records_reports_how_far_its_log_got(tmp_path):
    (tmp_path / "log.txt").write_text(unfinished_log(stop_epoch=3, epochs=5, stop_batch=20, batches=40))
    append_record(tmp_path, record(tmp_path, split="val", finished=False))
    state = read_run(tmp_path)
    assert state.progress == "stopped at epoch 3/5, batch 20/40"
    assert results_cli("progress", tmp_path).stdout.strip() == "epoch [3/5] batch [20/40]"


# ---- parse_results.py ------------------------------------------------------------------------------

def write_tree(root, with_records):
    """The same base-to-new and few-shot runs, written as records or as logs."""
    for seed, offset in zip((1, 2, 3), (-0.5, 0.25, 0.25), strict=True):
        for part, dataset, subsample, accuracy in (("base2new/train_base", "dtd", "base", 80.0),
                                                   ("base2new/test_new", "dtd", "new", 60.0),
                                                   ("fewshot", "eurosat", "all", 75.5)):
            if with_records:
                metrics = {**METRICS, "accuracy": accuracy + offset, "macro_f1": accuracy - 1 + offset}
                write_record_run(root, part, dataset, seed, metrics, subsample=subsample)
            else:
                write_run(root, part, dataset, seed,
                          rada_log(accuracy + offset, subsample=subsample, seed=seed, train=part != "base2new/test_new"))


def test_a_tree_of_records_and_a_tree_of_logs_give_the_same_tables(tmp_path):
    write_tree(tmp_path / "records", with_records=True)
    write_tree(tmp_path / "logs", with_records=False)
    from_records, from_logs = run_cli(tmp_path / "records"), run_cli(tmp_path / "logs")
    assert from_records.returncode == 0 and from_logs.returncode == 0, from_records.stderr + from_logs.stderr
    assert from_records.stdout.replace(str(tmp_path / "records"), "ROOT") == \
        from_logs.stdout.replace(str(tmp_path / "logs"), "ROOT")
    assert table_row(from_records.stdout, "DTD")[2:6] == ["80.00 +- 0.35", "60.00 +- 0.35", "68.57",
                                                          "53.24 / 59.90 / 56.37"]
    assert table_row(from_records.stdout, "EuroSAT")[1:] == ["3", "75.50 +- 0.35"]


def test_metric_flag_chooses_the_column(tmp_path):
    write_tree(tmp_path, with_records=True)
    result = run_cli(tmp_path, "--metric", "macro_f1", "--csv", tmp_path / "f1.csv")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    fewshot = out[out.index(f"== fewshot | trainer {TRAINER} | config {CFG} | 16 shots | metric macro_f1 | seeds 1 2 3"):]
    assert table_row(fewshot, "dataset")[2] == "macro_f1 (mean +- std)"
    assert table_row(fewshot, "EuroSAT")[1:] == ["3", "74.50 +- 0.35"]
    assert f"== base2new | trainer {TRAINER} | config {CFG} | 16 shots | metric macro_f1 | seeds 1 2 3" in out
    dtd = table_row(out, "DTD")
    assert dtd[2:] == ["79.00 +- 0.35", "59.00 +- 0.35", f"{2 * 79 * 59 / 138:.2f}"]  # no published accuracies
    assert "published" not in out
    with open(tmp_path / "f1.csv", newline="") as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert rows["EuroSAT"]["metric"] == "macro_f1" and rows["EuroSAT"]["acc_mean"] == "74.5"
    assert rows["DTD"]["metric"] == "macro_f1" and rows["DTD"]["base_mean"] == "79.0"


def test_unknown_metric_is_one_error_line_listing_the_metrics_found(tmp_path):
    write_tree(tmp_path, with_records=True)
    result = run_cli(tmp_path, "--metric", "f1")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: no finished run reports the metric 'f1'; the runs read report: accuracy, error_rate, macro_f1 "
        "(choose one with --metric)"]


def test_test_time_training_zero_shot_accuracy_is_a_metric_like_any_other(tmp_path, monkeypatch, capsys):
    for dataset, adapted, zero_shot in (("imagenet_a", 52.0, 50.0), ("imagenetv2", 63.0, 61.0)):
        write_record_run(tmp_path, "ttt", dataset, 1, {**METRICS, "accuracy": adapted, "zero_shot_accuracy": zero_shot},
                         trainer="RAdaTTT", cfg="vit_b16_imagenet", shots=0, subsample="all")
    write_run(tmp_path, "ttt", "imagenet_r", 1, rada_log(77.0, subsample="all", trainer="RAdaTTT", train=False),
              trainer="RAdaTTT", cfg="vit_b16_imagenet", shots=0)  # an older run: its log has no zero-shot metric
    drawn = record_drawn_charts(monkeypatch)
    target = tmp_path / "zero_shot.png"
    assert parse_results.main([str(tmp_path), "--seeds", "1", "--metric", "zero_shot_accuracy", "--plot", str(target)]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "ImageNet-A")[2] == "50.00" and table_row(out, "ImageNetV2")[2] == "61.00"
    assert "ImageNet-R" not in out.split("Finished runs without")[0]
    assert "Finished runs without zero_shot_accuracy (logs give only the accuracy; not counted): 1" in out
    assert "imagenet_r/shots_0/RAdaTTT/vit_b16_imagenet/seed1: it reports accuracy" in out
    assert {label: value for _, _, label, value, _ in drawn[str(target)]} == {
        "ImageNet-A": 50.0, "ImageNetV2": 61.0, "Domain generalisation average of the targets present (2 of 4)": 55.5}

    assert parse_results.main([str(tmp_path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert [table_row(out, label)[2] for label in ("ImageNet-A", "ImageNetV2", "ImageNet-R")] == ["52.00", "63.00", "77.00"]


def test_charts_of_another_metric_are_named_after_it(tmp_path, monkeypatch):
    write_tree(tmp_path, with_records=True)
    drawn = record_drawn_charts(monkeypatch)
    assert parse_results.main([str(tmp_path), "--metric", "error_rate", "--plot", str(tmp_path / "c.png")]) == 0
    fewshot = drawn[str(tmp_path / f"c_fewshot_{TRAINER}_{CFG}_shots16_error_rate.png")]
    assert [value for _, _, label, value, _ in fewshot if label == "EuroSAT"] == [8.75]
    base2new = drawn[str(tmp_path / f"c_base2new_{TRAINER}_{CFG}_shots16_error_rate.png")]
    assert {method for _, method, *_ in base2new} == {TRAINER}  # the published accuracies are not error rates


# ---- a run folder of the code before the records ---------------------------------------------------

def test_a_run_folder_written_before_the_records_reads_as_the_finished_run_its_log_shows(tmp_path):
    shown = re.findall(r"^\* result: .*split=test .*accuracy=([0-9.]+)%", (FIXTURE / "log.txt").read_text(), re.MULTILINE)
    assert shown == ["20.00"] and not (FIXTURE / RECORDS_NAME).exists()
    state = read_run(FIXTURE)
    assert state.finished and state.accuracy == 20.0 and state.reached == "epoch [2/2] batch [2/2]"

    run_dir = tmp_path / "base2new/train_base/synthetic_shapes/shots_4/RAdaCoOp/vit_b16_ep50_ctxv1/seed1"
    shutil.copytree(FIXTURE, run_dir)
    result = run_cli(tmp_path, "--seeds", "1")
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "synthetic_shapes")[1:3] == ["1/0", "20.00"]
    assert "Unfinished" not in result.stdout and "Rejected" not in result.stdout
    assert "backbone /tmp/rada_077bb5f/tiny-vit.pt" in result.stdout  # the result line names the tiny CLIP


# ---- train.py writes the records (once trainers/engine.py calls this API) -----------------------------

@requires_dassl
@pytest.mark.e2e
def test_train_py_records_every_evaluation_and_the_final_one_finished(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train("OPTIM.MAX_EPOCH", "2", "TEST.FINAL_MODEL", "best_val")
    assert trained.returncode == 0, trained.output[-3000:]
    records = read_records(run.train_dir)
    assert [(r["split"], r["finished"]) for r in records][-1] == ("test", True)
    assert not any(r["finished"] for r in records[:-1])
    final = records[-1]
    assert {"accuracy", "error_rate", "macro_f1"} <= set(final["metrics"])
    assert f"{final['metrics']['accuracy']:.2f}" == f"{trained.accuracy:.2f}"
    assert final["config"] == "vit_b16_ep50_ctxv1" and final["protocol"] == "" and final["trainer"] == "RAdaCoOp"
    assert final["subsample"] == "base" and final["shots"] == 4 and final["seed"] == 1
    assert final["backbone"] == str(tiny_clip_path)
    assert read_run(run.train_dir).metrics == final["metrics"]

    evaluated = run.evaluate()
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    assert [(r["split"], r["subsample"], r["finished"]) for r in read_records(run.test_dir)] == [("test", "new", True)]


@requires_dassl
@pytest.mark.e2e
def test_test_time_training_records_its_zero_shot_accuracy(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaTTT", "vit_b16_imagenet", synthetic_data_root, tiny_clip_path, tmp_path)
    options = ("DATALOADER.TEST.BATCH_SIZE", "4", "TRAINER.TTT.N_VIEWS", "3", "TRAINER.TTT.STEPS", "0")
    result = run.run(run.command(run.test_dir, "--eval-only", options=options), run.test_dir)
    assert result.returncode == 0, result.output[-3000:]
    zero_shot = float(re.findall(r"^\* zero-shot accuracy: ([0-9.]+)%", result.output, re.MULTILINE)[-1])
    final = read_records(run.test_dir)[-1]
    assert final["finished"] and f"{final['metrics']['zero_shot_accuracy']:.2f}" == f"{zero_shot:.2f}"
    assert final["metrics"]["zero_shot_accuracy"] == pytest.approx(final["metrics"]["accuracy"])  # no steps taken
