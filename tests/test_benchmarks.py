"""The performance benchmark scripts run end to end (tiny settings), so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=300, check=True,
    )


def test_perf_step_prints_ratios_and_writes_json(tmp_path):
    out = tmp_path / "step.json"
    result = run("perf_step.py", "--models", "cnn", "--bits", "2", "--steps", "2", "--warmup",
                 "1", "--implementations", "unique", "--no-memory", "--json", str(out))
    assert "time ratio" in result.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "cnn" and row["bits"] == 2 and row["ratio"] > 0


def test_perf_scaling_prints_a_row_per_cell(tmp_path):
    out = tmp_path / "scaling.json"
    run("perf_scaling.py", "--n", "1e4", "--k", "2", "4", "--repeats", "1",
        "--implementations", "chunked", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["implementation"], r["k"]) for r in rows} == {("chunked", 2), ("chunked", 4)}
    assert all(r["ms"] > 0 and r["extra_mb"] >= 0 for r in rows)


def test_unique_agreement_prints_small_value_differences():
    result = run("unique_agreement.py", "--n", "4000")
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert len(rows) == 8  # 2 distributions x 2 k x 2 taus
    for row in rows:
        soft_weights, centroids = float(row[3]), float(row[4])
        assert 0 < soft_weights < 1e-1 and 0 <= centroids < 1e-2


def test_implicit_gradient_script_prints_one_row_per_case():
    result = run("implicit_gradient.py")
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert len(rows) == 4
    assert float(rows[0][2]) < 1e-4  # k=4, tau=0.1: converged, implicit == unrolled limit
