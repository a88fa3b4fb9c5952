"""DKMCallback takes objects as well as strings, as Lightning's own callbacks do: a temperature
schedule or any callable ``unit -> tau``, a ClusteringMethod instance; bad values fail at
construction, naming the value and what is allowed."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import TinyNet, trainer

from lightning_dkm import DKMCallback, clustered_tensors
from lightning_dkm.lightning.schedules import ExponentialSchedule
from lightning_dkm.model.methods import DeepKMeansMethod, DKMMethod, HardMethod


class StepTaus(pl.Callback):
    """Every step's tau of body.0.weight (read after DKMCallback's batch start set it)."""

    def __init__(self) -> None:
        self.taus: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        t = clustered_tensors(pl_module)["body.0.weight"]
        self.taus.append(float(t.parametrization.temperature))


def fit(tmp_path, callback: DKMCallback, max_epochs: int = 2) -> StepTaus:
    spy = StepTaus()
    t = trainer(tmp_path, callbacks=[callback, spy], max_epochs=max_epochs,
                limit_val_batches=0)
    t.fit(TinyNet())
    return spy


def sqrt_decay(unit: int) -> float:
    return 0.05 / math.sqrt(1 + unit)


# -- temperature --------------------------------------------------------------------------------
def test_a_schedule_object_gives_tau_at_every_soft_step(tmp_path):
    schedule = ExponentialSchedule(start=1e-1, end=1e-3, num_units=8)
    spy = fit(tmp_path, DKMCallback(bits=2, finalize=False, temperature=schedule))
    assert spy.taus == pytest.approx([schedule(step) for step in range(8)], rel=1e-6)


def test_a_plain_callable_gives_tau_at_every_soft_step(tmp_path):
    spy = fit(tmp_path, DKMCallback(bits=2, finalize=False, temperature=sqrt_decay))
    assert spy.taus == pytest.approx([sqrt_decay(step) for step in range(8)], rel=1e-6)


def test_a_callable_moves_per_epoch_with_interval_epoch(tmp_path):
    cb = DKMCallback(bits=2, finalize=False,
                     temperature={"schedule": sqrt_decay, "interval": "epoch"})
    spy = fit(tmp_path, cb)
    assert spy.taus == pytest.approx([sqrt_decay(0)] * 4 + [sqrt_decay(1)] * 4, rel=1e-6)


def test_a_callable_needs_no_trainer_limit(tmp_path):
    spy = StepTaus()
    t = trainer(tmp_path, callbacks=[DKMCallback(bits=2, finalize=False, temperature=sqrt_decay),
                                     spy], max_epochs=-1, max_steps=3, limit_val_batches=0)
    t.fit(TinyNet())
    assert len(spy.taus) == 3


def test_the_callback_state_stays_primitives_with_a_callable_temperature():
    state = DKMCallback(bits=2, temperature=sqrt_decay).state_dict()
    assert state["temperature_config"] == {
        "schedule": "callable", "fn": f"{__name__}.sqrt_decay", "interval": "step"}

    def primitive(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and primitive(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(primitive(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert primitive(state)


@pytest.mark.parametrize(
    ("temperature", "message"),
    [
        (ExponentialSchedule, r"an instance, not the class ExponentialSchedule"),
        ({"schedule": ExponentialSchedule, "interval": "epoch"},
         r"an instance, not the class ExponentialSchedule"),
        (lambda unit: -1.0, r"calling it with unit 0 failed.*tau must be finite and > 0"),
        (lambda: 1.0, r"calling it with unit 0 failed.*takes the soft DKM step or epoch"),
        ({"schedule": sqrt_decay, "start": 1e-2},
         r"with a callable schedule only 'interval' may be given.*\['start'\]"),
        ({"schedule": sqrt_decay, "interval": "batch"}, r"interval must be one of.*'batch'"),
        ([1e-2], r"temperature must be 'auto', a number.*a TemperatureSchedule or a callable"),
        (True, r"temperature must be 'auto'.*got True"),
    ],
    ids=["class", "class-in-a-mapping", "negative-tau", "no-unit-argument",
         "callable-with-start", "bad-interval", "list", "bool"],
)
def test_a_bad_temperature_fails_at_construction_naming_it(temperature, message):
    with pytest.raises(ValueError, match=message):
        DKMCallback(temperature=temperature)


# -- method -------------------------------------------------------------------------------------
def test_a_method_instance_is_used_as_it_is(tmp_path):
    method = DeepKMeansMethod(regularization=1e-2, refresh_every=2)
    cb = DKMCallback(bits=2, finalize=False, method=method)
    assert cb.method is method
    fit(tmp_path, cb, max_epochs=1)
    assert method.steps == 4  # the instance itself was driven: one step per batch
    assert cb.state_dict()["method_state"]["steps"] == 4  # and its state is the callback's


@pytest.mark.parametrize("method", [DKMMethod(), HardMethod()], ids=["dkm", "hard"])
def test_a_method_instance_names_the_method_in_the_state(method):
    assert DKMCallback(method=method).state_dict()["method"] == method.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": DeepKMeansMethod(), "regularization": 1e-2},
         r"regularization=0\.01 only configure a method given by name.*set them on it"),
        ({"method": DeepKMeansMethod}, r"not the class DeepKMeansMethod"),
        ({"method": "kmeans"}, r"method must be one of \('dkm'.*or a ClusteringMethod instance"
                               r".*got 'kmeans'"),
        ({"method": HardMethod(), "hard_epoch": 1}, r"hard_epoch=1 only applies to method='dkm'"),
        ({"method": HardMethod(), "gradient": "implicit"}, r"implicit.*needs method='dkm'"),
    ],
    ids=["instance-and-regularization", "class", "unknown-name", "hard-epoch", "implicit"],
)
def test_a_bad_method_fails_at_construction_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DKMCallback(**kwargs)


def test_a_method_without_mode_for_epoch_is_refused():
    from lightning_dkm.model.methods import ClusteringMethod

    class Nameless(ClusteringMethod):
        name = "mine"

    with pytest.raises(ValueError, match=r"must implement mode_for_epoch"):
        DKMCallback(method=Nameless())


# -- targets: PEFT's bare names ------------------------------------------------------------------
def test_a_bare_module_name_selects_that_module_at_any_depth(tmp_path):
    class Nested(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.body[2] = torch.nn.Sequential()
            self.body[2].add_module("proj", torch.nn.Linear(64, 64))

    t = trainer(tmp_path, callbacks=[DKMCallback(bits=2, targets="proj", finalize=False)],
                max_epochs=1, limit_val_batches=0)
    model = Nested()
    t.fit(model)
    assert set(clustered_tensors(model)) == {"body.2.proj.weight"}


# -- temperature as a mapping -------------------------------------------------------------------
def test_the_temperature_mapping_type_has_every_field_of_the_config():
    """The typed dict a YAML mapping is parsed against (TemperatureArgument) is the config."""
    from dataclasses import fields

    from lightning_dkm.lightning.temperature import TemperatureConfig, TemperatureMapping

    assert list(TemperatureMapping.__annotations__) == [f.name for f in fields(TemperatureConfig)]


def test_a_step_schedule_needs_no_end():
    """``end`` is the step schedule's optional clamp (as for ExponentialSchedule's ``end``)."""
    cb = DKMCallback(temperature={"schedule": "step", "start": 0.1, "step_size": 2, "gamma": 0.5})
    assert cb.temperature.end is None
    assert cb.temperature.schedule_for((0.1, 0.1), None)(4) == pytest.approx(0.025)


# -- lut_dtype ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lut_dtype", "stored"), [("fp16", torch.float16), (torch.float32, torch.float32)],
    ids=["fp16", "torch.float32"],
)
def test_lut_dtype_takes_the_spellings_save_compressed_takes(tmp_path, lut_dtype, stored):
    from lightning_dkm import read_palettes

    cb = DKMCallback(bits=2, lut_dtype=lut_dtype, save_dir=str(tmp_path / "dkm"), verbose=False)
    fit(tmp_path, cb, max_epochs=1)
    palettes = read_palettes(tmp_path / "dkm" / "model.dkm.safetensors")
    assert {p.lut.dtype for p in palettes.values()} == {stored}


@pytest.mark.parametrize("lut_dtype", ["bfloat16", torch.bfloat16, "f16"])
def test_a_bad_lut_dtype_fails_at_construction_naming_it(lut_dtype):
    with pytest.raises(ValueError, match=r"lut_dtype must be torch\.float16 or torch\.float32, "
                                         rf"or one of the names 'float16'.*got {lut_dtype!r}"):
        DKMCallback(lut_dtype=lut_dtype)
