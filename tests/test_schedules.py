"""Specification of the DKM temperature schedules (unit -> tau)."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from lightning_dkm.lightning.schedules import (
    SCHEDULE_NAMES,
    CallableSchedule,
    TemperatureSchedule,
    build_schedule,
)


# Module-level callables so that the import-path form can resolve them.
def halving_tau(unit: int) -> float:
    return 1.0 / 2**unit


def negative_tau(unit: int) -> float:
    return -1.0 if unit == 3 else 1.0


def nan_tau(unit: int) -> float:
    return float("nan")


NOT_CALLABLE = 42


class ScheduleNamespace:
    @staticmethod
    def tau(unit: int) -> float:
        return 0.5


def test_schedule_names_lists_the_builtin_schedules() -> None:
    assert SCHEDULE_NAMES == ("constant", "linear", "exponential", "cosine", "step")


@pytest.mark.parametrize("name", ["constant", "linear", "exponential", "cosine"])
def test_every_named_schedule_is_a_temperature_schedule(name: str) -> None:
    schedule = build_schedule(name, start=1.0, end=0.1, num_units=5)
    assert isinstance(schedule, TemperatureSchedule)
    assert schedule.num_units == 5


# --- constant ---------------------------------------------------------------------------------


def test_constant_returns_start_at_every_unit() -> None:
    schedule = build_schedule("constant", start=0.3, end=None, num_units=None)
    assert [schedule(e) for e in (0, 1, 100)] == [0.3, 0.3, 0.3]


def test_constant_ignores_end() -> None:
    assert build_schedule("constant", start=0.3, end=0.01, num_units=4)(3) == 0.3


# --- interpolating schedules ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_start_at_start(name: str) -> None:
    assert build_schedule(name, start=2.0, end=0.02, num_units=10)(0) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_reach_end_at_the_last_unit(name: str) -> None:
    assert build_schedule(name, start=2.0, end=0.02, num_units=10)(9) == 0.02


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_hold_end_after_the_last_unit(name: str) -> None:
    schedule = build_schedule(name, start=2.0, end=0.02, num_units=10)
    assert schedule(10) == schedule(1000) == 0.02


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_with_one_unit_give_start(name: str) -> None:
    schedule = build_schedule(name, start=2.0, end=0.02, num_units=1)
    assert schedule(0) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_decrease_monotonically_when_end_is_below_start(
    name: str,
) -> None:
    schedule = build_schedule(name, start=1.0, end=0.01, num_units=20)
    values = [schedule(e) for e in range(20)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_can_increase(name: str) -> None:
    schedule = build_schedule(name, start=0.1, end=1.0, num_units=3)
    assert schedule(0) < schedule(1) < schedule(2) == 1.0


def test_linear_takes_equal_steps() -> None:
    schedule = build_schedule("linear", start=1.0, end=0.2, num_units=5)
    assert [schedule(e) for e in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_exponential_takes_equal_ratios() -> None:
    schedule = build_schedule("exponential", start=1.0, end=1e-3, num_units=4)
    assert [schedule(e) for e in range(4)] == pytest.approx([1.0, 1e-1, 1e-2, 1e-3])


def test_cosine_passes_the_midpoint_halfway() -> None:
    schedule = build_schedule("cosine", start=1.0, end=0.2, num_units=5)
    assert schedule(2) == pytest.approx(0.6)
    # Half-cosine: tau(t) = end + (start - end) * (1 + cos(pi * t / (T - 1))) / 2.
    assert schedule(1) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_require_num_units(name: str) -> None:
    with pytest.raises(ValueError, match="num_units=None"):
        build_schedule(name, start=1.0, end=0.1, num_units=None)


@pytest.mark.parametrize("name", ["linear", "exponential", "cosine"])
def test_interpolating_schedules_require_end(name: str) -> None:
    with pytest.raises(ValueError, match="end=None"):
        build_schedule(name, start=1.0, end=None, num_units=5)


# --- step ---------------------------------------------------------------------------------------


def test_step_multiplies_by_gamma_every_step_size_units() -> None:
    schedule = build_schedule("step", start=1.0, end=None, num_units=None, step_size=2, gamma=0.5)
    assert [schedule(e) for e in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_step_is_clamped_at_end_when_decaying() -> None:
    schedule = build_schedule("step", start=1.0, end=0.3, num_units=None, step_size=1, gamma=0.5)
    assert [schedule(e) for e in range(4)] == [1.0, 0.5, 0.3, 0.3]


def test_step_is_clamped_at_end_when_growing() -> None:
    schedule = build_schedule("step", start=1.0, end=3.0, num_units=None, step_size=1, gamma=2.0)
    assert [schedule(e) for e in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_step_holds_its_last_unit_value_after_num_units() -> None:
    schedule = build_schedule("step", start=1.0, end=None, num_units=3, step_size=1, gamma=0.5)
    assert schedule(2) == schedule(10) == 0.25


def test_step_requires_step_size_and_gamma() -> None:
    with pytest.raises(ValueError, match="gamma"):
        build_schedule("step", start=1.0, end=None, num_units=None, step_size=2)


@pytest.mark.parametrize("step_size", [0, -1, 1.5, True])
def test_step_rejects_step_size_below_one_or_non_int(step_size: object) -> None:
    with pytest.raises(ValueError, match=r"step_size must be an int >= 1, got"):
        build_schedule("step", 1.0, None, None, step_size=step_size, gamma=0.5)


@pytest.mark.parametrize("gamma", [0.0, -0.5, math.inf, math.nan])
def test_step_rejects_non_positive_or_non_finite_gamma(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got"):
        build_schedule("step", 1.0, None, None, step_size=1, gamma=gamma)


def test_step_whose_tau_underflows_to_zero_raises_at_call_time() -> None:
    schedule = build_schedule("step", start=1.0, end=None, num_units=None, step_size=1, gamma=0.1)
    with pytest.raises(ValueError, match=r"tau=0\.0 at unit 400"):
        schedule(400)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_start_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"start must be finite and > 0 .*got {bad!r}"):
        build_schedule("linear", start=bad, end=0.1, num_units=5)


@pytest.mark.parametrize("bad", [0.0, -0.1, math.inf])
def test_end_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"end must be finite and > 0 .*got {bad!r}"):
        build_schedule("cosine", start=1.0, end=bad, num_units=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_num_units_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match=r"num_units must be an int >= 1 or None"):
        build_schedule("linear", start=1.0, end=0.1, num_units=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_unit_must_be_a_non_negative_int(bad: object) -> None:
    schedule = build_schedule("constant", start=1.0, end=None, num_units=None)
    with pytest.raises(ValueError, match="unit must be an int >= 0"):
        schedule(bad)  # type: ignore[arg-type]


def test_unknown_name_lists_the_allowed_names_and_the_import_path_form() -> None:
    with pytest.raises(ValueError, match=r"allowed names are constant, linear, .*import path"):
        build_schedule("polynomial", start=1.0, end=0.1, num_units=5)


def test_extra_kwargs_are_rejected_for_schedules_that_take_none() -> None:
    with pytest.raises(ValueError, match=r"unexpected arguments \['gamma'\]"):
        build_schedule("linear", start=1.0, end=0.1, num_units=5, gamma=0.5)


# --- user callables ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"{__name__}.halving_tau", f"{__name__}:halving_tau"])
def test_import_path_resolves_a_user_callable(path: str) -> None:
    schedule = build_schedule(path, start=1.0, end=None, num_units=None)
    assert isinstance(schedule, CallableSchedule)
    assert [schedule(e) for e in range(3)] == [1.0, 0.5, 0.25]


def test_colon_import_path_may_name_a_nested_attribute() -> None:
    schedule = build_schedule(f"{__name__}:ScheduleNamespace.tau", 1.0, None, None)
    assert schedule(7) == 0.5


def test_user_callable_gets_the_raw_unit_even_after_num_units() -> None:
    schedule = build_schedule(f"{__name__}.halving_tau", start=1.0, end=None, num_units=2)
    assert schedule(3) == 0.125


def test_unimportable_module_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"could not import module 'no_such_pkg\.mod'"):
        build_schedule("no_such_pkg.mod.fn", start=1.0, end=None, num_units=None)


def test_missing_attribute_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="has no attribute 'missing_fn'"):
        build_schedule(f"{__name__}.missing_fn", start=1.0, end=None, num_units=None)


def test_non_callable_import_target_is_rejected() -> None:
    with pytest.raises(ValueError, match="not callable"):
        build_schedule(f"{__name__}.NOT_CALLABLE", start=1.0, end=None, num_units=None)


def test_user_callable_returning_non_positive_tau_raises_naming_unit_and_value() -> None:
    schedule = build_schedule(f"{__name__}.negative_tau", start=1.0, end=None, num_units=None)
    assert schedule(2) == 1.0
    with pytest.raises(ValueError, match=r"tau=-1\.0 at unit 3"):
        schedule(3)


def test_user_callable_returning_a_non_number_raises_naming_it() -> None:
    schedule = CallableSchedule(lambda unit: "hot")
    with pytest.raises(ValueError, match=r"returned tau='hot' at unit 1; tau must be finite"):
        schedule(1)


def test_user_callable_returning_nan_tau_raises() -> None:
    schedule = CallableSchedule(nan_tau)
    with pytest.raises(ValueError, match=r"tau=nan at unit 0"):
        schedule(0)


def test_callable_schedule_rejects_non_callables() -> None:
    with pytest.raises(ValueError, match="fn must be callable"):
        CallableSchedule(3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("gamma", [True, 0.0, float("nan"), "0.5"])
def test_a_step_schedule_refuses_a_gamma_that_is_not_a_finite_number_above_zero(gamma) -> None:
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got "
                                         + re.escape(repr(gamma))):
        build_schedule("step", start=1.0, end=None, num_units=None, step_size=1, gamma=gamma)
