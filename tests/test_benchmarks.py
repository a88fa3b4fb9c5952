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


# -- the accuracy study (benchmarks/accuracy_study.py) --------------------------------------------
def _load_study():
    import importlib.util

    path = BENCHMARKS / "accuracy_study.py"
    spec = importlib.util.spec_from_file_location("accuracy_study_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _apple_dkm():
    """benchmarks/apple_dkm.py (the coremltools wrapper), imported from the benchmarks folder."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import apple_dkm

    return apple_dkm


def test_accuracy_study_charlm_tiny_runs_every_method_for_every_seed(tmp_path):
    study = _load_study()
    cfg = study.CharLMConfig.tiny()
    skipped: list[str] = []
    rows = study.run_charlm(cfg, log=lambda message: None, skipped=skipped)
    expected = set(study.DEFAULT_METHODS)
    if _apple_dkm().apple_dkm_unavailable() is not None:
        expected.discard(study.APPLE)
    if study.sensitivity_unavailable() is not None:
        expected.discard(study.SENSITIVITY)
    assert len(skipped) == len(set(study.DEFAULT_METHODS) - expected)
    assert {r["method"] for r in rows} == expected | {"fp32"}
    for method in expected:  # one row per seed (and width)
        assert sorted(r["seed"] for r in rows if r["method"] == method) == list(cfg.seeds)
    for row in rows:
        assert row["heldout_bpc"] > 0 and row["bytes"] > 0
    clustered = [r for r in rows if r["bits"] == 2]
    assert len({r["bytes"] for r in clustered}) == 1  # one size per width, whatever the method
    assert clustered[0]["bytes"] < rows[0]["bytes"]
    dkm = [r for r in rows if r["method"] == "dkm"]
    assert all(r["temperature"]["source"] == "DKMCallback default" for r in dkm)
    for row in (r for r in rows if r["method"] == study.APPLE):
        assert row["distinct_values_max"] <= 2 ** row["bits"]
    out = study.write_results({"charlm": rows}, tmp_path, stem="tiny")
    saved = json.loads(out["json"].read_text())
    summary = {(e["method"], e["bits"]): e for e in saved["summary"]["charlm"]}
    assert summary[("dkm", 2)]["n"] == len(cfg.seeds)
    assert summary[("fp32", 32)]["n"] == 1


def test_accuracy_study_summary_table_and_replot(tmp_path):
    study = _load_study()
    rows = [dict(model="m", method="fp32", bits=32, cluster_dim=1, seed=None, heldout_bpc=2.0,
                 bytes=400)]
    for seed, (a, b) in enumerate([(2.5, 3.0), (2.7, 3.4)]):
        rows += [dict(model="m", method="dkm", bits=2, cluster_dim=1, seed=seed,
                      heldout_bpc=a, bytes=100),
                 dict(model="m", method="palettize", bits=2, cluster_dim=1, seed=seed,
                      heldout_bpc=b, bytes=100),
                 dict(model="m", method="fp32_finetune", bits=32, cluster_dim=1, seed=seed,
                      heldout_bpc=1.9, bytes=400)]
    summary = {(e["method"], e["bits"]): e for e in study.summarize(rows, "heldout_bpc")}
    assert summary[("dkm", 2)]["mean"] == 2.6 and summary[("dkm", 2)]["n"] == 2
    assert abs(summary[("palettize", 2)]["std"] - 0.2828427) < 1e-6
    table = study._table(rows, "heldout_bpc")
    assert "2.6000 ± 0.1414" in table and "fp32_finetune" in table
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"charlm": rows}))
    result = run("accuracy_study.py", "--replot", str(path))
    assert "2.6000 ± 0.1414" in result.stdout


def test_apple_dkm_wrapper_trains_and_snaps_to_at_most_2_bits_values():
    apple_dkm = _apple_dkm()
    if apple_dkm.apple_dkm_unavailable() is not None:
        import pytest

        pytest.skip(apple_dkm.apple_dkm_unavailable())
    import torch
    from torch import nn

    from lightning_dkm import CompressionReport
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.model.targets import select_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    x = torch.randn(256, 24)
    y = x[:, :1] * x[:, 1:2]
    targets = select_targets(model, ClusterSpec(bits=2))
    assert [t.module_name for t in targets] == ["0", "2"]  # the last layer is below min_size
    prepared, palettizer = apple_dkm.prepare_apple_dkm(model, [t.module_name for t in targets],
                                                       bits=2)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (prepared(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        palettizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < sum(losses[:5])
    state = apple_dkm.finalize_apple_dkm(palettizer, prepared)
    plain = nn.Sequential(nn.Linear(24, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    plain.load_state_dict(state)
    palettes = apple_dkm.palettes_from_snapped(plain, targets)
    for name, palette in palettes.items():
        assert torch.unique(plain.get_parameter(name)).numel() <= 4
        assert max(palette.distinct_values_per_palette()) <= 4
    report = CompressionReport.build(plain, palettes, lut_dtype=torch.float16)
    assert report.clustered_parameters == 24 * 128 + 128 * 64


def test_packed_inference_compares_dense_and_packed_side_by_side(tmp_path):
    out = tmp_path / "packed.json"
    result = run("packed_inference.py", "--quick", "--repeats", "2", "--json", str(out))
    assert "ratios" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "cnn"
    assert row["packed"]["state_bytes"] == row["report_bytes"]  # the artifact's bytes, held
    assert row["state_ratio"] > 10 and row["dense"]["latency_ms"] > 0


def test_perf_distributed_compares_fsdp_with_dkm_side_by_side(tmp_path):
    out = tmp_path / "distributed.json"
    result = run("perf_distributed.py", "--width", "64", "--heads", "2", "--layers", "1",
                 "--vocab", "512", "--context", "64", "--seq", "16", "--steps", "1",
                 "--configs", "fsdp", "fsdp_dkm4", "--fast-seed", "--json", str(out))
    assert "fsdp_dkm4 / fsdp: peak memory" in result.stdout
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fsdp", "fsdp_dkm4"}
    assert all(r["world"] == 2 and r["peak_mb"] > r["base_mb"] > 0 and r["step_s"] > 0
               for r in rows.values())
    assert rows["fsdp"]["parameters"] == rows["fsdp_dkm4"]["parameters"]
