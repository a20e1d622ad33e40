"""The backbone is part of a run's identity in the results: the `* result:` line names it, and
scripts/parse_results.py gives each backbone its own tables, with the published (OpenAI ViT-B/16)
numbers only beside the ViT-B/16 ones."""
import csv
import json
import re

import pytest

from tests.conftest import requires_dassl
from tests.run_logs import CFG, TRAINER, load_parse_results, rada_log, record_drawn_charts, write_run
from tests.train_harness import TrainRun
from trainers.runs.results import parse_log, read_run, result_line

parse_results = load_parse_results()
OPEN_CLIP = "open_clip:ViT-B-16/laion2b_s34b_b88k"
OTHER_CFG = "vit_b16_laion"


def write_pair(root, dataset, base, new, *, cfg=CFG, backbone=None, seeds=(1, 2)):
    """train_base and test_new runs of `dataset`: seed s has base + s and new + s."""
    for seed in seeds:
        write_run(root, "base2new/train_base", dataset, seed,
                  rada_log(base + seed, seed=seed, backbone=backbone), cfg=cfg)
        write_run(root, "base2new/test_new", dataset, seed,
                  rada_log(new + seed, subsample="new", seed=seed, train=False, backbone=backbone), cfg=cfg)


def tables(stdout):
    """{heading: {first cell: cells}} of every table in the output."""
    found, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("== "):
            current = found.setdefault(line, {})
        elif line.startswith("|") and current is not None and not line.startswith("|--"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            current[cells[0]] = cells
    return found


def heading(cfg, backbone):
    return f"== base2new | trainer {TRAINER} | config {cfg} | 16 shots | backbone {backbone} | seeds 1 2 =="


def test_result_line_names_the_backbone_last_and_old_parsers_still_read_it(tmp_path):
    backbone = "/home/me/my models/tiny clip.pt (weights /w x.pt)"  # a local file's path may hold spaces
    line = result_line(dataset="DescribableTextures", subsample="base", split="test", shots=16, seed=1,
                       trainer=TRAINER, accuracy=71.234, backbone=backbone)
    assert line.endswith(f"accuracy=71.23% backbone={backbone}")
    assert re.search(r"^\* result: .*accuracy=([0-9.]+)%", line).group(1) == "71.23"  # the tests' old regex
    log = tmp_path / "log.txt"
    log.write_text(f"Evaluate on the *test* set\n{line}\n")
    result = parse_log(log)
    assert result.accuracy == 71.23 and result.fields["backbone"] == backbone and result.fields["seed"] == "1"


def test_two_backbones_get_two_tables_and_the_published_numbers_only_beside_vit_b16(tmp_path, capsys):
    # The same datasets and seeds on two backbones (two configs), and one group mixing both backbones.
    write_pair(tmp_path, "dtd", 70.0, 60.0, backbone="ViT-B/16")
    write_pair(tmp_path, "dtd", 50.0, 40.0, cfg=OTHER_CFG, backbone=OPEN_CLIP)
    write_pair(tmp_path, "eurosat", 30.0, 20.0, backbone=OPEN_CLIP)
    assert parse_results.main([str(tmp_path), "--seeds", "1", "2", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    found = tables(out)
    vit = found[heading(CFG, "ViT-B/16")]
    assert vit["DTD"][:5] == ["DTD", "2/2", "71.50 +- 0.50", "61.50 +- 0.50", f"{2 * 71.5 * 61.5 / 133:.2f}"]
    assert vit["dataset"][5].startswith("CLIP") and "EuroSAT" not in vit
    other = found[heading(OTHER_CFG, OPEN_CLIP)]
    assert other["DTD"] == ["DTD", "2/2", "51.50 +- 0.50", "41.50 +- 0.50", f"{2 * 51.5 * 41.5 / 93:.2f}"]
    assert other["dataset"] == ["dataset", "seeds B/N", "base (mean +- std)", "new", "HM"]
    mixed = found[heading(CFG, OPEN_CLIP)]
    assert mixed["EuroSAT"][:4] == ["EuroSAT", "2/2", "31.50 +- 0.50", "21.50 +- 0.50"] and "DTD" not in mixed
    assert len(mixed["dataset"]) == 5
    assert len([h for h in found if h.startswith("== base2new")]) == 3
    assert sum(h.startswith("== published base-to-new averages") for h in found) == 1
    assert "Missing runs" not in out  # a backbone's table expects only its own datasets
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = {(row["cfg"], row["backbone"], row["dataset"]): row["base_mean"] for row in csv.DictReader(handle)}
    assert rows == {(CFG, "ViT-B/16", "DTD"): "71.5", (OTHER_CFG, OPEN_CLIP, "DTD"): "51.5",
                    (CFG, OPEN_CLIP, "EuroSAT"): "31.5"}


def test_tables_of_other_backbones_alone_print_no_published_numbers(tmp_path, capsys):
    write_pair(tmp_path, "dtd", 50.0, 40.0, backbone=OPEN_CLIP)
    assert parse_results.main([str(tmp_path), "--seeds", "1", "2"]) == 0
    found = tables(capsys.readouterr().out)
    assert list(found) == [heading(CFG, OPEN_CLIP)]


def test_logs_without_the_field_take_the_backbone_of_run_json_then_of_the_config_file(tmp_path, capsys):
    write_pair(tmp_path, "dtd", 70.0, 60.0)  # no run.json, a config of ours naming ViT-B/16
    write_pair(tmp_path, "dtd", 50.0, 40.0, cfg=OTHER_CFG)  # no config file of that name: ViT-B/16
    write_pair(tmp_path, "eurosat", 30.0, 20.0, cfg=OTHER_CFG)
    for part in ("train_base", "test_new"):
        for seed in (1, 2):
            run_dir = tmp_path / "base2new" / part / "eurosat" / "shots_16" / TRAINER / OTHER_CFG / f"seed{seed}"
            record = {"argv": [], "request": {}, "config": {"MODEL.BACKBONE.NAME": "open_clip:ViT-B-16",
                                                            "MODEL.BACKBONE.WEIGHTS": "/w/laion.pt"}}
            (run_dir / "run.json").write_text(json.dumps(record))
    assert parse_results.main([str(tmp_path), "--seeds", "1", "2"]) == 0
    found = tables(capsys.readouterr().out)
    assert found[heading(CFG, "ViT-B/16")]["DTD"][2] == "71.50 +- 0.50"
    assert found[heading(OTHER_CFG, "ViT-B/16")]["DTD"][2] == "51.50 +- 0.50"
    weights = found[heading(OTHER_CFG, "open_clip:ViT-B-16 (weights /w/laion.pt)")]
    assert weights["EuroSAT"][2] == "31.50 +- 0.50" and "DTD" not in weights
    assert parse_results.config_file_backbone("ZeroshotCLIP", "rn50") == "RN50"


def test_charts_draw_published_bars_only_for_vit_b16(tmp_path, monkeypatch, capsys):
    write_pair(tmp_path, "dtd", 70.0, 60.0, backbone="ViT-B/16")
    write_pair(tmp_path, "dtd", 50.0, 40.0, backbone=OPEN_CLIP, cfg=OTHER_CFG)
    drawn = record_drawn_charts(monkeypatch)
    target = tmp_path / "charts" / "r.png"
    assert parse_results.main([str(tmp_path), "--seeds", "1", "2", "--plot", str(target)]) == 0
    vit = drawn[str(tmp_path / "charts" / f"r_base2new_{TRAINER}_{CFG}_shots16.png")]
    other = drawn[str(tmp_path / "charts" / f"r_base2new_{TRAINER}_{OTHER_CFG}_shots16_open_clip-ViT-B-16-laion2b_s34b_b88k.png")]
    assert {method for _, method, *_ in vit} > {TRAINER, "CLIP"}
    assert {method for _, method, *_ in other} == {TRAINER}
    assert [value for column, _, label, value, _ in other if column == "base" and label == "DTD"] == [51.5]


@requires_dassl
@pytest.mark.e2e
def test_train_py_result_line_names_the_backbone(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("ZeroshotCLIP", "vit_b16", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.run(run.command(run.test_dir, "--eval-only"), run.test_dir)
    assert result.returncode == 0, result.output[-3000:]
    state = read_run(run.test_dir)
    assert state.accuracy == result.accuracy and state.fields["backbone"] == str(tiny_clip_path)
