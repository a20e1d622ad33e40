"""The published base-to-new numbers (scripts/baselines/base2new_vit_b16.csv) against the papers' averages."""
import csv
import statistics
from pathlib import Path

import pytest

BASELINES = Path(__file__).resolve().parents[1] / "scripts" / "baselines" / "base2new_vit_b16.csv"
DATASETS = {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
# The 11-dataset averages as printed by the CoCoOp, MaPLe and PromptSRC papers (Table 1).
PAPER_AVERAGES = {
    "CLIP": (69.34, 74.22, 71.70),
    "CoOp": (82.69, 63.22, 71.66),
    "CoCoOp": (80.47, 71.69, 75.83),
    "MaPLe": (82.28, 75.14, 78.55),
    "PromptSRC": (84.26, 76.10, 79.97),
}


def load_rows():
    with open(BASELINES, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def harmonic_mean(base, new):
    return 2 * base * new / (base + new)


ROWS = load_rows()


def test_header_and_every_row_has_a_source():
    with open(BASELINES, encoding="utf-8") as handle:
        assert handle.readline().strip() == "dataset,method,base,new,hm,source"
    for row in ROWS:
        assert row["source"].strip(), row
    assert len({(row["dataset"], row["method"]) for row in ROWS}) == len(ROWS), "duplicate rows"


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row['method']}-{row['dataset']}")
def test_each_hm_recomputes_from_base_and_new(row):
    base, new, hm = float(row["base"]), float(row["new"]), float(row["hm"])
    assert harmonic_mean(base, new) == pytest.approx(hm, abs=0.01)


@pytest.mark.parametrize("method", sorted(PAPER_AVERAGES))
def test_per_dataset_columns_reproduce_the_published_averages(method):
    rows = [row for row in ROWS if row["method"] == method and row["dataset"] != "average"]
    assert {row["dataset"] for row in rows} == DATASETS
    base = statistics.fmean(float(row["base"]) for row in rows)
    new = statistics.fmean(float(row["new"]) for row in rows)
    paper_base, paper_new, paper_hm = PAPER_AVERAGES[method]
    assert base == pytest.approx(paper_base, abs=0.01)
    assert new == pytest.approx(paper_new, abs=0.01)
    # The papers' average HM is the HM of the averaged base and new, not the mean of the HMs.
    assert harmonic_mean(base, new) == pytest.approx(paper_hm, abs=0.01)
    average_row = next(row for row in ROWS if row["method"] == method and row["dataset"] == "average")
    assert tuple(float(average_row[key]) for key in ("base", "new", "hm")) == PAPER_AVERAGES[method]


def test_rada_averages_are_the_authors_own_table():
    rada = [row for row in ROWS if row["method"].startswith("RAda")]
    # The EFT rows of the authors' README table (assets/eft.png of github.com/khufia/RAda).
    assert [(row["dataset"], row["method"], row["base"], row["new"], row["hm"]) for row in rada] == [
        ("average", "RAda", "82.16", "74.14", "77.94"),
        ("average", "RAda + Prompt", "84.18", "75.61", "79.67"),
        ("average", "RAda + Adapter", "84.32", "76.25", "80.08"),
    ]
    for row in rada:
        assert "github.com/khufia/RAda" in row["source"] and "assets/eft.png" in row["source"], row
        assert "unconfirmed" not in row["source"].lower() and not row["source"].lower().startswith("secondary")
