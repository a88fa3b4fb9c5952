"""DKMCallback's temperature: calibrated per tensor to an assignment entropy when DKM starts,
annealed every optimizer step, shown in the progress bar; explicit schedules keep their units."""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import TinyNet, trainer

from lightning_dkm import DKMCallback, clustered_tensors
from lightning_dkm.lightning.temperature import (
    DEFAULT_START_ENTROPY,
    TemperatureConfig,
    geometric_mean,
    mean_assignment_entropy,
)

STEPS_PER_EPOCH = 4  # TinyNet: 128 samples, batches of 32


class TauSpy(pl.Callback):
    """After DKMCallback's batch start: every tensor's tau, and its entropy at the first step."""

    def __init__(self) -> None:
        self.taus: list[dict[str, float]] = []
        self.first_entropy: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        tensors = clustered_tensors(pl_module)
        self.taus.append({n: float(t.parametrization.temperature) for n, t in tensors.items()})
        if not self.first_entropy:
            for name, t in tensors.items():
                x = t.parametrization.layout.to_palettes(t.original.detach())
                self.first_entropy[name] = mean_assignment_entropy(
                    x, t.parametrization.centroids, self.taus[-1][name]
                )


def tau_bounds(callback: DKMCallback) -> dict[str, list[float]]:
    """Each tensor's calibrated ``[start, end]`` tau, as the callback's state (what a resume
    restores) records them."""
    return callback.state_dict()["temperature"]["bounds"]


def fit(tmp_path, callback, **kwargs):
    torch.manual_seed(0)
    spy = TauSpy()
    t = trainer(tmp_path, callbacks=[callback, spy], **kwargs)
    t.fit(TinyNet())
    return spy, t


def test_the_default_starts_at_a_tenth_of_log2_k_bits_of_entropy_for_every_tensor(tmp_path):
    cb = DKMCallback(bits=2, overrides={"body.2": {"bits": 4}}, finalize=False)
    spy, _ = fit(tmp_path, cb, max_epochs=1)
    assert spy.first_entropy["body.0.weight"] == pytest.approx(DEFAULT_START_ENTROPY * 2, rel=1e-3)
    assert spy.first_entropy["body.2.weight"] == pytest.approx(DEFAULT_START_ENTROPY * 4, rel=1e-3)
    # one meaning, two taus: the 4-bit tensor needs a much smaller tau for the same softness
    assert spy.taus[0]["body.2.weight"] < spy.taus[0]["body.0.weight"] / 3


def test_the_default_anneals_every_step_within_one_epoch_to_the_end_entropy(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    spy, _ = fit(tmp_path, cb, max_epochs=1)
    assert len(spy.taus) == STEPS_PER_EPOCH
    for name in spy.taus[0]:
        series = [step[name] for step in spy.taus]
        assert series == sorted(series, reverse=True) and len(set(series)) == len(series)
        start, end = tau_bounds(cb)[name]
        assert series[0] == pytest.approx(start) and series[-1] == pytest.approx(end)
        ratios = [b / a for a, b in itertools.pairwise(series)]
        assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-6)  # exponential


def test_the_default_anneals_under_max_steps(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    spy, t = fit(tmp_path, cb, max_epochs=-1, max_steps=6)
    assert t.global_step == 6 and len(spy.taus) == 6
    name = "body.0.weight"
    assert spy.taus[-1][name] == pytest.approx(tau_bounds(cb)[name][1])


def test_tau_moves_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    spy, _ = fit(tmp_path, cb, max_epochs=2, accumulate_grad_batches=2)
    series = [step["body.0.weight"] for step in spy.taus]
    assert series[0::2] == series[1::2]  # the two micro-batches of a step share tau
    assert len(set(series)) == 4  # 2 epochs x 2 optimizer steps


def test_the_progress_bar_shows_the_tau_in_force(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    spy, t = fit(tmp_path, cb, max_epochs=1)
    assert float(t.progress_bar_metrics["dkm/tau"]) == pytest.approx(
        geometric_mean(spy.taus[-1]), rel=1e-6
    )


def test_start_epoch_delays_calibration_and_the_anneal_to_the_dkm_steps(tmp_path):
    cb = DKMCallback(bits=2, start_epoch=1, finalize=False)
    spy, _ = fit(tmp_path, cb, max_epochs=2)
    name = "body.0.weight"
    start, end = tau_bounds(cb)[name]
    dkm_steps = [step[name] for step in spy.taus[STEPS_PER_EPOCH:]]
    assert dkm_steps[0] == pytest.approx(start) and dkm_steps[-1] == pytest.approx(end)


def test_explicit_numbers_keep_their_units_and_anneal_per_step(tmp_path):
    cb = DKMCallback(bits=2, finalize=False, temperature={"start": 1e-1, "end": 1e-3})
    spy, _ = fit(tmp_path, cb, max_epochs=1)
    series = [step["body.0.weight"] for step in spy.taus]
    expected = [1e-1 * (1e-2) ** (s / (STEPS_PER_EPOCH - 1)) for s in range(STEPS_PER_EPOCH)]
    assert series == pytest.approx(expected, rel=1e-6)


def test_hard_clustering_measures_entropy_at_the_calibrated_start(tmp_path):
    cb = DKMCallback(bits=2, method="hard", finalize=False)
    spy, _ = fit(tmp_path, cb, max_epochs=2)
    series = [step["body.0.weight"] for step in spy.taus]
    start = tau_bounds(cb)["body.0.weight"][0]
    assert series == pytest.approx([start] * len(series))


@pytest.mark.parametrize(
    ("temperature", "message"),
    [
        ({"interval": "batch"}, r"interval must be one of \('step', 'epoch'\); got 'batch'"),
        ({"start_entropy": 1.5}, r"start_entropy must be a fraction.*1\.5"),
        ({"end_entropy": 0}, r"end_entropy must be a number of bits > 0; got 0"),
        ({"schedule": "step", "step_size": 2, "gamma": 0.5}, r"start='auto' needs"),
        ({"colour": 1}, r"unknown keys \['colour'\]"),
        ("hot", r"temperature must be 'auto', a number"),
        ({"start": "warm"}, r"temperature\.start must be 'auto' or a finite number"),
    ],
)
def test_bad_temperatures_fail_at_construction_naming_the_value(temperature, message):
    with pytest.raises(ValueError, match=message):
        DKMCallback(temperature=temperature)


def test_a_config_is_checked_when_it_is_built_not_only_when_parsed():
    with pytest.raises(ValueError, match=r"interval must be one of \('step', 'epoch'\)"):
        TemperatureConfig(interval="batch")
    with pytest.raises(ValueError, match=r"calling it with unit 0 failed"):
        TemperatureConfig(schedule=lambda unit: -1.0, start=None, end=None)


def test_auto_is_the_default_and_parses_from_a_string():
    assert DKMCallback().temperature == TemperatureConfig()
    assert DKMCallback(temperature="auto").temperature == TemperatureConfig()
    assert TemperatureConfig().interval == "step"
    assert math.isclose(TemperatureConfig.parse(1e-3).start, 1e-3)
