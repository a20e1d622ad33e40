"""parse_results.py --plot: the charts show the numbers of the text tables."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.run_logs import load_parse_results, rada_log, record_drawn_charts, write_run

REPO = Path(__file__).resolve().parents[1]
parse_results = load_parse_results()
PUBLISHED = parse_results.load_published()
OFFSETS = (-0.5, 0.25, 0.25)


def write_benchmark(root):
    """All 11 datasets over three seeds, each dataset with its own base and new accuracies."""
    for number, dataset in enumerate(parse_results.BENCHMARK):
        for seed, offset in zip((1, 2, 3), OFFSETS, strict=True):
            write_run(root, "base2new/train_base", dataset, seed, rada_log(60 + number + offset, seed=seed))
            write_run(root, "base2new/test_new", dataset, seed,
                      rada_log(50 + 2 * number - offset, subsample="new", seed=seed, train=False))
    for seed, offset in zip((1, 2, 3), OFFSETS, strict=True):
        write_run(root, "dg/train", "imagenet", seed, rada_log(70 + offset, subsample="all", seed=seed))
        for number, target in enumerate(parse_results.FFT_TARGETS):
            write_run(root, "dg/test", target, seed,
                      rada_log(40 + number + offset, subsample="all", seed=seed, train=False))


def table_rows(stdout):
    """{first cell: cells} of every markdown table row, per table (tables in print order)."""
    tables, current = [], None
    for line in stdout.splitlines():
        if line.startswith("== "):
            current = {}
            tables.append(current)
        elif line.startswith("|") and current is not None and not line.startswith("|--"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            current[cells[0]] = cells
    return tables


def mean_and_spread(cell):
    mean, _, spread = cell.partition(" +- ")
    return float(mean), float(spread) if spread else None


@pytest.fixture
def charted(tmp_path, monkeypatch, capsys):
    """Runs parse_results --plot in process; returns (stdout tables, {chart path: bars drawn})."""
    write_benchmark(tmp_path)
    drawn = record_drawn_charts(monkeypatch)
    assert parse_results.main([str(tmp_path), "--plot", str(tmp_path / "charts" / "results.png")]) == 0
    return table_rows(capsys.readouterr().out), drawn, tmp_path


def test_base2new_chart_shows_the_table(charted):
    tables, drawn, root = charted
    path = root / "charts" / "results_base2new_RAdaCoOp_vit_b16_ep50_ctxv1_shots16.png"
    bars = drawn[str(path)]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 1000
    table = tables[0]
    ours = {(column, label): (value, error) for column, method, label, value, error in bars if method == "RAdaCoOp"}
    for label, cells in table.items():
        if label == "dataset":
            continue
        for column, cell in zip(("base", "new", "hm"), cells[2:5], strict=True):
            value, error = ours[(column, label)]
            mean, spread = mean_and_spread(cell)
            assert f"{value:.2f}" == f"{mean:.2f}" and (error is None) == (spread is None), (label, column)
            if spread is not None:
                assert f"{error:.2f}" == f"{spread:.2f}"
        published = {(column, method): value for column, method, row, value, _ in bars if row == label
                     and method != "RAdaCoOp"}
        for method_cell, method in zip(cells[5:], ("CLIP", "CoOp", "CoCoOp", "MaPLe", "PromptSRC"), strict=True):
            numbers = [float(x) for x in method_cell.split(" / ")]
            assert [published[(c, method)] for c in ("base", "new", "hm")] == pytest.approx(numbers, abs=0.005)
    # Methods published only as an average sit at the 11-dataset average, from the CSV.
    average = "Average (11 datasets)"
    for method in ("RAda", "RAda + Prompt", "RAda + Adapter"):
        shown = [value for column, m, row, value, _ in bars if m == method and row == average]
        assert shown == list(PUBLISHED[("average", method)][:3])
        assert not [row for _, m, row, _, _ in bars if m == method and row != average]


def test_dg_chart_shows_the_table(charted):
    tables, drawn, root = charted
    bars = drawn[str(root / "charts" / "results_dg_RAdaCoOp_vit_b16_ep50_ctxv1_shots16.png")]
    table = tables[1]
    shown = {label: (value, error) for _, _, label, value, error in bars}
    rows = {label: cells for label, cells in table.items() if label != "dataset"}
    assert set(shown) == set(rows)
    for label, cells in rows.items():
        mean, spread = mean_and_spread(cells[2])
        assert f"{shown[label][0]:.2f}" == f"{mean:.2f}"
        assert (shown[label][1] is None and spread is None) or f"{shown[label][1]:.2f}" == f"{spread:.2f}"


def test_plot_flag_from_the_command_line_writes_one_png(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "base2new/train_base", "dtd", seed, rada_log(60.0 + seed, seed=seed))
        write_run(tmp_path, "base2new/test_new", "dtd", seed, rada_log(50.0, subsample="new", seed=seed, train=False))
    target = tmp_path / "chart.png"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "parse_results.py"), str(tmp_path), "--seeds", "1", "2",
                           "--plot", str(target)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Wrote {target}" in done.stdout
    with Image.open(target) as image:
        assert image.format == "PNG"
        image.verify()
