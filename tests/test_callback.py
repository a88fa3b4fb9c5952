"""DKMCallback: the Lightning lifecycle, as a user meets it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, trainer
from torch import nn
from torch.nn.utils import parametrize

import lightning_dkm
from lightning_dkm import CompressionReport, DKMCallback, carried_palettes, clustered_tensors
from lightning_dkm.engine.numerics import hard_assign
from lightning_dkm.lightning.schedules import build_schedule


def fit(tmp_path, callback: DKMCallback, model: TinyNet | None = None, **trainer_kwargs):
    model = model or TinyNet()
    t = trainer(tmp_path, callbacks=[callback, *trainer_kwargs.pop("extra_callbacks", [])],
                **trainer_kwargs)
    t.fit(model)
    return model, t


class TauRecorder(pl.Callback):
    """Reads tau and mode from the model during every training epoch."""

    def __init__(self) -> None:
        self.taus: list[float] = []
        self.modes: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        tensors = list(clustered_tensors(pl_module).values())
        self.taus.append(float(tensors[0].parametrization.temperature))
        self.modes.append(tensors[0].parametrization.mode)


# -- the finished model -------------------------------------------------------------------------
def test_fit_leaves_a_plain_model_with_at_most_2_pow_bits_values(tmp_path):
    model, _ = fit(tmp_path, DKMCallback(bits=2, save_dir=str(tmp_path / "dkm")))
    assert type(model.body[0]) is nn.Linear and not hasattr(model.body[0], "parametrizations")
    assert torch.unique(model.body[0].weight).numel() <= 4
    assert torch.unique(model.body[2].weight).numel() <= 4


def test_report_is_saved_as_json_and_markdown(tmp_path):
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    fit(tmp_path, cb)
    assert cb.output_paths["json"] == tmp_path / "dkm" / "compression_report.json"
    assert CompressionReport.load(cb.output_paths["json"]) == cb.report
    assert (tmp_path / "dkm" / "compression_report.md").read_text() == cb.report.to_markdown()


def test_the_results_are_an_object_the_callback_holds_and_reads_through(tmp_path):
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model, _ = fit(tmp_path, cb)
    results = cb.results
    assert results.report is cb.report and results.palettes is cb.palettes
    assert results.stats is cb.stats and results.output_paths is cb.output_paths
    assert results.artifact_path == cb.artifact_path == tmp_path / "dkm" / "model.dkm.safetensors"
    assert results.finalized_model is cb.finalized_model is model


def test_finalize_false_keeps_the_parametrizations(tmp_path):
    model, _ = fit(tmp_path, DKMCallback(bits=2, finalize=False))
    assert set(clustered_tensors(model)) == {"body.0.weight", "body.2.weight"}


def test_overrides_give_a_tensor_its_own_bits(tmp_path):
    cb = DKMCallback(bits=2, overrides={"body.2": {"bits": 3}}, save_dir=str(tmp_path))
    model, _ = fit(tmp_path, cb)
    assert cb.palettes["body.0.weight"].layout.spec.bits == 2
    assert cb.palettes["body.2.weight"].layout.spec.bits == 3
    assert torch.unique(model.body[2].weight).numel() <= 8


def test_small_tensors_are_skipped_with_one_warning_naming_them(tmp_path):
    with pytest.warns(UserWarning, match=r"min_size=2048.*body\.4\.weight \(256 elements\)"):
        model, _ = fit(tmp_path, DKMCallback(bits=2, finalize=False))
    assert "body.4.weight" not in clustered_tensors(model)


def test_targets_and_exclude_select_tensors(tmp_path):
    model, _ = fit(
        tmp_path, DKMCallback(bits=2, targets=["body.*"], exclude=["body.2"], finalize=False)
    )
    assert set(clustered_tensors(model)) == {"body.0.weight"}


# -- temperature, start and hard epochs ------------------------------------------------------------
def test_tau_follows_the_schedule_at_each_epoch_start(tmp_path):
    recorder = TauRecorder()
    temperature = {"schedule": "exponential", "start": 1e-1, "end": 1e-3, "interval": "epoch"}
    fit(tmp_path, DKMCallback(bits=2, temperature=temperature, finalize=False),
        extra_callbacks=[recorder], max_epochs=3)
    expected = [build_schedule("exponential", 1e-1, 1e-3, num_units=3)(e) for e in range(3)]
    assert recorder.taus == pytest.approx(expected, rel=1e-6)
    assert recorder.taus[-1] == pytest.approx(1e-3)


def test_a_callable_schedule_is_given_by_import_path(tmp_path):
    recorder = TauRecorder()
    fit(tmp_path, DKMCallback(bits=2, finalize=False,
                              temperature={"schedule": "math.exp", "interval": "epoch"}),
        extra_callbacks=[recorder], max_epochs=2)
    assert recorder.taus == pytest.approx([math.exp(0), math.exp(1)])


def test_training_is_plain_before_start_epoch_and_hard_from_hard_epoch(tmp_path):
    recorder = TauRecorder()
    cb = DKMCallback(bits=2, start_epoch=1, hard_epoch=3, finalize=False)
    _model, _ = fit(tmp_path, cb, extra_callbacks=[recorder], max_epochs=4)
    assert recorder.modes == ["dense", "soft", "soft", "hard"]


def test_centroids_are_seeded_at_start_epoch_from_the_weights_then(tmp_path):
    class SeedSpy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            t = clustered_tensors(pl_module)["body.0.weight"]
            self.seen = [*getattr(self, "seen", []), bool(t.parametrization.initialized)]

    spy = SeedSpy()
    fit(tmp_path, DKMCallback(bits=2, start_epoch=1, finalize=False),
        extra_callbacks=[spy], max_epochs=2)
    assert spy.seen == [False, True]


def test_dkm_start_reads_each_weight_once_and_holds_at_most_a_wave_of_them(tmp_path,
                                                                         monkeypatch):
    # Under FSDP2 each read is a gather of the whole weight: seeding and the tau calibration
    # share one, and a weight is done with (seeded, calibrated) before the next wave's read.
    from lightning_dkm.engine import kmeans
    from lightning_dkm.lightning.temperature import TemperaturePlan
    from lightning_dkm.model.attach import ClusteredTensor

    plans: list[TemperaturePlan] = []
    real_calibrate = TemperaturePlan.calibrate

    def calibrate(self, palettes):
        plans.append(self)
        return real_calibrate(self, palettes)

    reads: list[tuple[str, int]] = []  # (weight, tensors calibrated when it was read)
    real_read = ClusteredTensor.full_original

    def read(self):
        reads.append((self.param_name, len(plans[-1].bounds) if plans else -1))
        return real_read(self)

    monkeypatch.setattr(TemperaturePlan, "calibrate", calibrate)
    monkeypatch.setattr(ClusteredTensor, "full_original", read)
    monkeypatch.setattr(kmeans, "WAVE_WEIGHTS", 1)  # one tensor per wave
    at_start: list[tuple[str, int]] = []

    class AtFirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not at_start:
                at_start.extend(reads)

    fit(tmp_path, DKMCallback(bits=2, finalize=False, temperature={"start": "auto"}),
        extra_callbacks=[AtFirstBatch()], max_epochs=1)
    # TinyNet's two clustered weights, each read once, the second after the first's calibration
    assert [calibrated for _, calibrated in at_start] == [0, 1]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"temperature": {"schedule": "wavy", "start": 1e-2}},
            r"schedule must be one of.*exponential.*got 'wavy'",
        ),
        ({"temperature": -1e-3}, r"temperature\.start.*-0\.001"),
        ({"temperature": {"schedule": "linear", "start": 1e-2, "end": 0.0}}, r"end.*0\.0"),
        ({"overrides": {"body.0": {"bits": 9}}}, r"overrides\['body\.0'\].*bits.*9"),
        ({"overrides": {"body.0": {"colour": 1}}}, r"unknown keys \['colour'\]"),
        ({"start_epoch": 3, "hard_epoch": 1}, r"hard_epoch.*start_epoch \(3\).*1"),
        ({"bits": 0}, r"bits.*1\.\.8.*0"),
        ({"max_iter": 0}, r"max_iter.*0"),
        ({"gradient": "exact"}, r"gradient must be one of.*got 'exact'"),
        ({"gradient": "implicit", "implementation": "reference"},
         r"implicit.*weighted core.*implementation='reference'"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DKMCallback(**kwargs)


def test_targets_that_match_nothing_list_the_existing_names(tmp_path):
    with pytest.raises(ValueError, match=r"'decoder\.\*' matches no.*body\.0\.weight"):
        fit(tmp_path, DKMCallback(targets=["decoder.*"]))


# -- state -----------------------------------------------------------------------------------------
def test_two_callbacks_have_distinct_state_keys_and_cluster_disjoint_tensors(tmp_path):
    first = DKMCallback(bits=2, targets=["body.0"], save_dir=str(tmp_path / "a"))
    second = DKMCallback(bits=3, targets=["body.2"], save_dir=str(tmp_path / "b"))
    assert first.state_key != second.state_key
    model, _ = fit(tmp_path, first, extra_callbacks=[second])
    assert torch.unique(model.body[0].weight).numel() <= 4
    assert torch.unique(model.body[2].weight).numel() <= 8


def test_two_callbacks_on_the_same_tensor_are_refused(tmp_path):
    first = DKMCallback(bits=2, targets=["body.0"])
    second = DKMCallback(bits=3, targets=["body.0"], exclude=[])
    with pytest.raises(MisconfigurationException,
                       match=r"already clustered by another DKMCallback of this Trainer"):
        fit(tmp_path, first, extra_callbacks=[second])


def test_a_new_callback_on_a_model_an_earlier_fit_left_clustered_is_refused_before_it_runs(
        tmp_path):
    """Another instance's parametrizations left by a finalize=False fit: refused at setup,
    before the allocation runs training_step, naming what continues or clears them."""
    model, _ = fit(tmp_path, DKMCallback(bits=2, finalize=False, save_dir=str(tmp_path / "a")))
    steps = []
    original = model.training_step
    model.training_step = lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs)
    with pytest.raises(MisconfigurationException, match=(
            r"\['body\.0\.weight', .*\] still hold the DKM parametrizations of an earlier fit "
            r"with another DKMCallback instance.*ckpt_path.*lightning_dkm\.finalize\(model\)"
            r".*lightning_dkm\.release\(model\)")):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(tmp_path / "b")), model=model)
    assert steps == []  # the allocation's training_step never ran
    trained = {name: t.original.detach().clone() for name, t in clustered_tensors(model).items()}
    lightning_dkm.release(model)  # what the message offers: the weights as trained
    assert not clustered_tensors(model)
    assert all(torch.equal(model.get_parameter(name), w) for name, w in trained.items())
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(tmp_path / "b")), model=model)
    assert torch.unique(model.body[0].weight).numel() <= 4


def test_checkpoints_load_with_weights_only(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, DKMCallback(bits=2), enable_checkpointing=True, extra_callbacks=[checkpoint])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "body.0.weight" in state["state_dict"]
    assert not any("parametrizations" in k for k in state["state_dict"])
    (key,) = [k for k in state["callbacks"] if k.startswith("DKMCallback")]
    assert set(state["callbacks"][key]["model"]["tensors"]) == {"body.0.weight", "body.2.weight"}


def test_test_after_fit_from_the_best_checkpoint_evaluates_its_snapped_weights(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    cb = DKMCallback(bits=2, save_dir=str(tmp_path))
    model, t = fit(tmp_path, cb, enable_checkpointing=True, extra_callbacks=[checkpoint],
                   max_epochs=3)
    results = t.test(ckpt_path="best", verbose=False)
    assert math.isfinite(results[0]["test_loss"])
    assert type(model.body[0]) is nn.Linear  # finalized again after the test run
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    dkm_state = best["callbacks"][cb.state_key]["model"]["tensors"]
    carried = carried_palettes(model)
    for module in ("body.0", "body.2"):
        entries = dkm_state[f"{module}.weight"]["entries"]
        original = entries[f"{module}.parametrizations.weight.original"]
        centroids = entries[f"{module}.parametrizations.weight.0.centroids"]
        _, snapped = hard_assign(original.reshape(1, -1, 1), centroids)
        assert torch.equal(best["state_dict"][f"{module}.weight"], snapped.reshape(original.shape))
        assert torch.equal(model.get_submodule(module).weight, snapped.reshape(original.shape))
        # the palette the model carries is the best checkpoint's, not the last epoch's
        assert torch.equal(carried[f"{module}.weight"].lut, centroids)


class ReadsItsWeightTwice(TinyNet):
    """A forward that reads a clustered weight twice, as nn.TransformerEncoderLayer's fast-path
    check and tied weights do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body[1](self.body[0](x))
        middle = self.body[2]
        hidden = torch.relu(hidden @ middle.weight.T + middle.bias)
        assert middle.weight.shape == (64, 64)  # the second read
        return self.body[4](hidden)


def test_each_training_forward_runs_dkm_once_per_tensor(tmp_path):
    """Each DKM step moves the centroids, so a weight clustered twice in one forward would end
    elsewhere: the model that reads a weight twice trains exactly as the one that reads it once
    (the same function of the same weights)."""

    def train(model_class: type[TinyNet]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(0)
        model = model_class()
        fit(tmp_path, DKMCallback(bits=2, finalize=False), model, max_epochs=1,
            limit_train_batches=3, limit_val_batches=0)
        return {n: (t.parametrization.centroids.detach().clone(), t.original.detach().clone())
                for n, t in clustered_tensors(model).items()}

    once, twice = train(TinyNet), train(ReadsItsWeightTwice)
    assert once.keys() == twice.keys() == {"body.0.weight", "body.2.weight"}
    for name, (centroids, weight) in once.items():  # x @ W.T + b rounds as F.linear may not
        torch.testing.assert_close(twice[name][0], centroids, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(twice[name][1], weight, rtol=1e-5, atol=1e-7, msg=name)
    assert parametrize._cache_enabled == 0  # the cache does not outlive the step


class GradientSpy(pl.Callback):
    """Every clustered Parameter's gradient norm at each optimizer step."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append({
            n: float(t.original.grad.norm()) if t.original.grad is not None else float("nan")
            for n, t in clustered_tensors(pl_module).items()
        })


def test_implicit_gradient_trains_with_a_weighted_core_step(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = GradientSpy()
    fit(tmp_path, DKMCallback(bits=2, gradient="implicit", finalize=False), model,
        extra_callbacks=[spy], max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    tensors = clustered_tensors(model)
    assert set(tensors) == {"body.0.weight", "body.2.weight"}
    assert all(  # "auto" never picks the plain-autograd "reference" step for it
        t.parametrization.step_implementation in ("unique", "chunked")
        and t.parametrization.gradient == "implicit"
        for t in tensors.values()
    )
    assert len(spy.norms) == 3
    for step in spy.norms:
        for name, norm in step.items():
            assert math.isfinite(norm) and norm > 0, (name, norm)
    for name, tensor in tensors.items():
        module = name.rsplit(".", 1)[0]
        start = before[f"{module}.weight"]
        assert not torch.equal(tensor.original.detach(), start), name  # the weights moved
