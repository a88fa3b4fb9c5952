"""Temperature schedules for DKM: map a DKM unit (a soft step or epoch) to the softmax
temperature ``tau``.

DKM assigns each weight ``w`` softly to the centroids ``c_j`` with
``a_j = softmax_j(-|w - c_j|^2 / tau)``. A large ``tau`` keeps the assignment soft (every
centroid gets gradient), a small one makes it nearly hard (the trained weights approach the
palettized ones that will be exported). Annealing ``tau`` from ``start`` down to ``end`` over
training moves from the first regime to the second.

A unit is what DKMCallback's temperature ``interval`` moves tau by: an optimizer step (the default)
or an epoch. Units are counted from the start of DKM (``0`` is the first soft unit, whatever the
trainer's global step or epoch is). ``num_units`` is the total number of soft units ``T``;
interpolating schedules reach ``end`` exactly at unit ``T - 1`` and hold the value of that unit
afterwards.
Nothing here imports Lightning.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.layout import is_int, is_number

__all__ = [
    "ANNEALED_SCHEDULES",
    "SCHEDULE_NAMES",
    "CallableSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LinearSchedule",
    "StepSchedule",
    "TemperatureSchedule",
    "build_schedule",
    "is_import_path",
]

SCHEDULE_NAMES: tuple[str, ...] = ("constant", "linear", "exponential", "cosine", "step")


def _as_tau(value: Any) -> float | None:
    """``value`` as a float if it is a valid temperature (a finite number > 0), else ``None``."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        return None
    return tau if math.isfinite(tau) and tau > 0 else None


def _check_tau(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a valid temperature (finite and > 0)."""
    tau = _as_tau(value)
    if tau is None:
        raise ValueError(f"{name} must be finite and > 0 (tau must be > 0), got {value!r}")
    return tau


def _check_num_units(num_units: int | None) -> int | None:
    if num_units is None:
        return None
    if not is_int(num_units, 1):
        raise ValueError(f"num_units must be an int >= 1 or None, got {num_units!r}")
    return num_units


class TemperatureSchedule(ABC):
    """A map ``unit -> tau`` with ``unit`` counted from the first soft unit.

    Subclasses implement :meth:`_tau`; :meth:`__call__` validates the unit (an ``int >= 0``)
    and the result (finite and ``> 0``), so every schedule fails loudly instead of feeding a
    zero, negative or NaN temperature into the softmax.

    Attributes:
        num_units: total number of soft units ``T``, or ``None`` when open-ended.
    """

    num_units: int | None

    def __call__(self, unit: int) -> float:
        """Return the temperature for soft unit ``unit`` (0-based)."""
        if not is_int(unit, 0):
            raise ValueError(
                f"unit must be an int >= 0 (counted from the first soft unit), got {unit!r}"
            )
        tau = self._tau(unit)
        value = _as_tau(tau)
        if value is None:
            raise ValueError(
                f"schedule {self!r} returned tau={tau!r} at unit {unit}; tau must be finite and > 0"
            )
        return value

    @abstractmethod
    def _tau(self, unit: int) -> float:
        """Return the (unvalidated) temperature for a validated ``unit >= 0``."""


@dataclass(frozen=True)
class ConstantSchedule(TemperatureSchedule):
    """``tau(t) = start`` for every unit. ``num_units`` is optional and unused."""

    start: float
    num_units: int | None = None

    def __post_init__(self) -> None:
        _check_tau("start", self.start)
        _check_num_units(self.num_units)

    def _tau(self, unit: int) -> float:
        return float(self.start)


@dataclass(frozen=True)
class _AnnealedSchedule(TemperatureSchedule):
    """Base for schedules that interpolate ``start -> end`` over ``num_units`` units.

    The interpolation variable is ``s = min(t, T - 1) / (T - 1)`` in ``[0, 1]`` (``s = 0`` when
    ``T == 1``, so a one-unit run uses ``start``); at ``s = 1`` tau is ``end`` exactly, and
    units past the last hold it.
    """

    start: float
    end: float
    num_units: int | None

    def __post_init__(self) -> None:
        _check_tau("start", self.start)
        _check_tau("end", self.end)
        if _check_num_units(self.num_units) is None:
            raise ValueError(
                f"num_units=None is not allowed for {type(self).__name__}: it interpolates "
                "start -> end over a known number of units; pass num_units >= 1 or use the "
                "'constant' or 'step' schedule"
            )

    def _tau(self, unit: int) -> float:
        assert self.num_units is not None  # guaranteed by __post_init__
        last = self.num_units - 1
        s = 0.0 if last == 0 else min(unit, last) / last
        return float(self.end) if s == 1.0 else self._between(s)

    @abstractmethod
    def _between(self, s: float) -> float:
        """Tau at the fraction ``s`` in ``[0, 1)`` of the way from ``start`` to ``end``."""


@dataclass(frozen=True)
class LinearSchedule(_AnnealedSchedule):
    """``tau(t) = start + (end - start) * s`` with ``s = t / (T - 1)``: equal steps in tau."""

    def _between(self, s: float) -> float:
        return self.start + (self.end - self.start) * s


@dataclass(frozen=True)
class ExponentialSchedule(_AnnealedSchedule):
    """``tau(t) = start * (end / start) ** s`` with ``s = t / (T - 1)``: equal *ratios* per unit.

    Because the softmax logits scale as ``1 / tau``, a geometric decay sharpens the assignment
    by the same factor every unit. Evaluated in log space for accuracy.
    """

    def _between(self, s: float) -> float:
        return math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * s)


@dataclass(frozen=True)
class CosineSchedule(_AnnealedSchedule):
    """``tau(t) = end + (start - end) * (1 + cos(pi * s)) / 2`` with ``s = t / (T - 1)``.

    Flat near both ends: stays soft for longer at the start and settles gently onto ``end``.
    """

    def _between(self, s: float) -> float:
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * s)) / 2.0


@dataclass(frozen=True)
class StepSchedule(TemperatureSchedule):
    """``tau(t) = start * gamma ** (t // step_size)``, clamped at ``end`` when given.

    The clamp follows the direction of travel: with ``gamma < 1`` tau never drops below
    ``end``, with ``gamma > 1`` it never rises above it. ``num_units`` is optional; when given,
    units past ``num_units - 1`` hold the value of that last unit.
    """

    start: float
    step_size: int
    gamma: float
    end: float | None = None
    num_units: int | None = None

    def __post_init__(self) -> None:
        _check_tau("start", self.start)
        if self.end is not None:
            _check_tau("end", self.end)
        _check_num_units(self.num_units)
        if not is_int(self.step_size, 1):
            raise ValueError(f"step_size must be an int >= 1, got {self.step_size!r}")
        gamma = self.gamma
        if not (is_number(gamma) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")

    def _tau(self, unit: int) -> float:
        if self.num_units is not None:
            unit = min(unit, self.num_units - 1)
        tau = self.start * self.gamma ** (unit // self.step_size)
        if self.end is not None:
            tau = max(tau, self.end) if self.gamma < 1 else min(tau, self.end)
        return tau


@dataclass(frozen=True)
class CallableSchedule(TemperatureSchedule):
    """Wrap a user callable ``unit -> tau`` so that its results are validated.

    The callable receives the raw soft unit (no holding after ``num_units``); a non-numeric,
    non-finite or non-positive result raises ``ValueError`` naming the unit and the value.
    """

    fn: Callable[[int], float]
    num_units: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"fn must be callable (unit -> tau), got {self.fn!r}")
        _check_num_units(self.num_units)

    def _tau(self, unit: int) -> float:
        return self.fn(unit)


#: The schedules that move tau from ``start`` to ``end`` over a known number of units.
ANNEALED_SCHEDULES: dict[str, type[_AnnealedSchedule]] = {
    "linear": LinearSchedule,
    "exponential": ExponentialSchedule,
    "cosine": CosineSchedule,
}


def is_import_path(schedule: object) -> bool:
    """Whether ``schedule`` names a custom callable (``"package.module.function"`` or
    ``"package.module:function"``) rather than one of :data:`SCHEDULE_NAMES`."""
    return isinstance(schedule, str) and schedule not in SCHEDULE_NAMES and (
        "." in schedule or ":" in schedule
    )


def _resolve_callable(path: str) -> Callable[[int], float]:
    """Import ``"package.module:attr"`` or ``"package.module.attr"`` and return the callable.

    After a colon, ``attr`` may be dotted (``"pkg.mod:Class.method"``).
    """
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(
            f"schedule={path!r} is not a valid import path; expected 'package.module.function' "
            "or 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"schedule={path!r}: could not import module {module_name!r} ({err})"
        ) from err
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(
                f"schedule={path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(obj):
        raise ValueError(
            f"schedule={path!r} resolved to {obj!r}, which is not callable; "
            "a custom schedule must be a callable unit -> tau"
        )
    return obj


def build_schedule(
    schedule: str,
    start: float,
    end: float | None = None,
    num_units: int | None = None,
    **kwargs: Any,
) -> TemperatureSchedule:
    """Build a temperature schedule ``unit -> tau`` from a config-friendly description.

    Args:
        schedule: one of :data:`SCHEDULE_NAMES`, or the import path of a user callable
            ``unit -> tau`` written ``"package.module.function"`` or
            ``"package.module:function"``.
        start: temperature at soft unit 0 (finite, > 0). Validated for custom callables too,
            but not passed to them.
        end: final temperature (finite, > 0). Required by ``linear``, ``exponential`` and
            ``cosine``; the optional clamp of ``step``; ignored (but validated) by ``constant``.
        num_units: total number of soft units, or ``None`` when open-ended (only ``constant``,
            ``step`` and custom callables accept ``None``).
        **kwargs: ``step_size`` (int >= 1) and ``gamma`` (> 0) for ``step``; no other schedule
            takes extra arguments.

    Returns:
        A :class:`TemperatureSchedule`; calling it validates the unit and the returned tau.

    Raises:
        ValueError: unknown schedule name, unimportable or non-callable import path, invalid
            ``start``/``end``/``num_units``/``step_size``/``gamma``, or unexpected kwargs.
    """
    if not isinstance(schedule, str):
        raise ValueError(f"schedule must be a str, got {schedule!r}")
    allowed_kwargs = {"step_size", "gamma"} if schedule == "step" else set()
    unexpected = sorted(set(kwargs) - allowed_kwargs)
    if unexpected:
        raise ValueError(
            f"unexpected arguments {unexpected} for schedule={schedule!r}; "
            "only 'step' takes extra arguments (step_size, gamma)"
        )

    # Each schedule checks its own fields; what it does not take is checked here (a bad value is
    # a mistake even where it is unused).
    if schedule == "constant":
        if end is not None:
            _check_tau("end", end)
        return ConstantSchedule(start=start, num_units=num_units)
    if schedule in ANNEALED_SCHEDULES:
        if end is None:
            raise ValueError(f"end=None is not allowed for schedule={schedule!r}; pass end > 0")
        return ANNEALED_SCHEDULES[schedule](start=start, end=end, num_units=num_units)
    if schedule == "step":
        missing = sorted({"step_size", "gamma"} - set(kwargs))
        if missing:
            raise ValueError(f"schedule='step' requires {missing}")
        return StepSchedule(start=start, end=end, num_units=num_units, **kwargs)
    if is_import_path(schedule):
        _check_tau("start", start)
        if end is not None:
            _check_tau("end", end)
        return CallableSchedule(fn=_resolve_callable(schedule), num_units=num_units)
    raise ValueError(
        f"schedule={schedule!r} is not a known schedule; allowed names are "
        f"{', '.join(SCHEDULE_NAMES)}, or an import path 'package.module.function' / "
        "'package.module:function' of a callable unit -> tau"
    )
