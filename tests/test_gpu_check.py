"""bench/gpu_check.sh's CPU parts at toy sizes, so that the GPU check does not rot between GPU runs."""

import os
import subprocess
import sys

import pytest

from tests.train_harness import REPO
from trainers.model.precision import cpu_runs_half_precision

pytestmark = pytest.mark.e2e  # runs a script end to end


def test_gpu_check_runs_its_cpu_parts_and_passes_every_check():
    environment = dict(os.environ, RADA_SKIP_SETUP="1",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--device", "cpu", "--small"],
                            cwd=REPO, env=environment, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    parts = {line.split("|")[1].strip() for line in table[1:]}
    assert parts == {"head", "train", "determinism", "eval", "ttt"}, result.stdout
    for impl in ("blocked", "fused", "dense"):
        assert any(f"| {impl} B=4 K=12 fp32" in line for line in table), impl
    # The fused and blocked heads were compared with the dense one in float64 on the way.
    assert sum("rel. error vs dense fp64" in line for line in table) == 2
    for trainer, rows in (("RAda ", 2), ("RAdaCoOp ", 2), ("RAdaMaPLe ", 2), ("RAdaAdapter ", 2), ("RAdaFT ", 1)):
        assert sum(line.startswith("| train") and f"| {trainer}PREC" in line for line in table) == rows, trainer
    if cpu_runs_half_precision():  # fp16 and amp then run in half precision on the CPU, and their checks with them
        for mode in ("fp16", "amp"):
            train_rows = [line for line in table if line.startswith("| train") and f"PREC {mode} " in line]
            assert train_rows and all(f"CLIP {mode}, trainables fp32" in line for line in train_rows), mode
    assert any("bitwise equal (head: fused)" in line for line in table), result.stdout  # on the CPU: fused
    assert "all checks passed" in result.stdout


def test_a_failing_case_becomes_a_failed_row_and_the_check_goes_on(capsys):
    from bench.gpu_check import Table, failures_reported

    table = Table()
    with failures_reported(table, "train", "RAdaCoOp PREC fp16"):
        raise RuntimeError("expected scalar type Half but found Float\nmore detail")
    table.add("train", "RAda PREC fp16", check="CLIP fp16, trainables fp32")
    assert table.failures == ["train RAdaCoOp PREC fp16: RuntimeError: expected scalar type Half but found Float"]
    assert [row[1] for row in table.rows] == ["RAdaCoOp PREC fp16", "RAda PREC fp16"]
    assert "Traceback" in capsys.readouterr().err  # for diagnosis, beside the table
