r"""A temperature with one meaning at every bit width, layer and scale.

DKM's tau is in units of a palette's weight variance
(:func:`lightning_dkm.engine.numerics.normalization_of`), which makes it independent of the
weights' scale but not of the number of centroids: at a fixed tau the assignments' entropy grows
roughly as :math:`k^2` (``docs/how_dkm_works.md``, "One meaning at every bit width").

A temperature given by the **entropy it produces** means the same thing everywhere. For one
tensor (its palettes ``x`` and their centroids), :func:`temperature_for_entropy` finds by
bisection the tau at which the mean Shannon entropy of the soft assignments,

.. math::

    \bar H(\tau) = \frac{1}{N}\sum_{i} -\sum_j a_{ij}\log_2 a_{ij},

equals a target. :math:`\bar H` increases monotonically with tau (from 0 for hard assignments
to :math:`\log_2 k` for uniform ones), so the bisection (in :math:`\log\tau`) converges to the
unique solution. It runs on a deterministic, evenly strided subsample of at most
``max_points`` vectors, with the distances computed once and shared by the start and the end tau.
Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor

from ..engine.kmeans import sq_distances
from ..engine.layout import check_keys, is_number
from ..engine.numerics import normalization_of
from .schedules import (
    ANNEALED_SCHEDULES,
    SCHEDULE_NAMES,
    CallableSchedule,
    TemperatureSchedule,
    build_schedule,
    is_import_path,
)

__all__ = [
    "DEFAULT_END_ENTROPY",
    "DEFAULT_MAX_POINTS",
    "DEFAULT_START_ENTROPY",
    "TemperatureConfig",
    "TemperatureMapping",
    "TemperaturePlan",
    "geometric_mean",
    "mean_assignment_entropy",
    "temperature_for_entropy",
]

#: Vectors per tensor that the calibration looks at (evenly strided over each palette).
DEFAULT_MAX_POINTS = 1 << 14
_LN2 = math.log(2.0)
#: The bisection's bracket (tau in units of the weight variance: from far harder to far softer
#: than any useful temperature) and its iterations: 30 halvings of it in log space pin tau to a
#: relative 2e-8.
_TAU_LOW, _TAU_HIGH, _BISECTIONS = 1e-6, 1e3, 30


def _distances(x: Tensor, centroids: Tensor, max_points: int) -> Tensor:
    """Squared distances ``(P, k, m)`` in the units DKM's tau is in, from each palette's
    centroids to at most ``max_points // P`` (at least 1) evenly strided vectors of it."""
    x = x.detach().float()
    P, n, _ = x.shape
    m = max(1, min(n, max_points // max(P, 1)))
    if m < n:
        index = torch.linspace(0, n - 1, m, device=x.device).round().long()
        x = x.index_select(1, index)
    norm = normalization_of(x)
    xn = (x - norm.center) / norm.scale  # (P, m, d)
    cn = (centroids.detach().float().to(x.device) - norm.center) / norm.scale  # (P, k, d)
    return sq_distances(xn.mT, cn)


#: Log-assignments below this are raised to it before ``exp``: their assignment (below
#: ``e^-87``, 1.6e-38, float32's smallest normal number) is 0 or subnormal, and ``exp`` of such
#: arguments takes x86's slow path: a whole entropy evaluation at k = 16 took 2.3-2.7x as long
#: (one thread, (1, 16, 16384) distances at tau 1e-3..1e-1). Each such term then adds
#: ``87 e^-87 / ln 2`` (2e-36) bits instead of less: below float32's resolution of any entropy
#: the calibration compares with a target, so the calibrated taus are unchanged (bit for bit on
#: the accuracy study's MiniLM encoder at 2 and 4 bits, ``tests/test_temperature.py``).
_LOG_FLOOR = -87.0


def _entropy_bits(distances: Tensor, tau: float) -> float:
    """Mean entropy (bits) of ``softmax(-distances / tau)`` over the centroid axis."""
    log_a = torch.log_softmax(distances / -tau, dim=1).clamp_min_(_LOG_FLOOR)
    return float(-(log_a.exp() * log_a).sum(1).mean() / _LN2)


class _EntropyCurve:
    r""":math:`\bar H(\tau)` of one tensor: its distances computed once, each tau evaluated
    once (the start's and the end's bisections share the bracket's ends and their first
    midpoints)."""

    def __init__(self, x: Tensor, centroids: Tensor, max_points: int) -> None:
        self.distances = _distances(x, centroids, max_points)
        self._seen: dict[float, float] = {}

    def __call__(self, tau: float) -> float:
        if tau not in self._seen:
            self._seen[tau] = _entropy_bits(self.distances, tau)
        return self._seen[tau]


def _check_target(k: int, entropy_bits: float, name: str) -> None:
    top = math.log2(k)
    if not (0.0 < float(entropy_bits) < top):
        raise ValueError(
            f"{name}: the target assignment entropy must lie in (0, log2 k = {top:g}) bits; "
            f"got {entropy_bits!r}"
        )


def _bisect(entropy: _EntropyCurve, entropy_bits: float) -> float:
    """:func:`temperature_for_entropy`'s search on an entropy curve."""
    low, high = math.log(_TAU_LOW), math.log(_TAU_HIGH)
    if entropy(_TAU_LOW) >= entropy_bits:
        return _TAU_LOW
    if entropy(_TAU_HIGH) <= entropy_bits:
        return _TAU_HIGH
    for _ in range(_BISECTIONS):
        middle = 0.5 * (low + high)
        if entropy(math.exp(middle)) < entropy_bits:
            low = middle
        else:
            high = middle
    return math.exp(0.5 * (low + high))


@torch.no_grad()
def mean_assignment_entropy(
    x: Tensor, centroids: Tensor, tau: float, max_points: int = DEFAULT_MAX_POINTS
) -> float:
    """Mean entropy in bits of the soft assignments of ``x`` (palettes ``(P, n, d)``) to
    ``centroids`` ``(P, k, d)`` at ``tau`` (units of each palette's weight variance), on the
    same subsample that :func:`temperature_for_entropy` uses."""
    return _entropy_bits(_distances(x, centroids, max_points), tau)


@torch.no_grad()
def temperature_for_entropy(
    x: Tensor,
    centroids: Tensor,
    entropy_bits: float,
    max_points: int = DEFAULT_MAX_POINTS,
    name: str = "weight",
) -> float:
    """The tau (units of each palette's weight variance) at which the soft assignments of ``x``
    ``(P, n, d)`` to ``centroids`` ``(P, k, d)`` have mean entropy ``entropy_bits``.

    Args:
        x: the tensor's palettes.
        centroids: their current centroids.
        entropy_bits: the target, in ``(0, log2 k)``.
        max_points: vectors looked at (an evenly strided subsample; deterministic).
        name: the tensor's name, for messages.

    Returns:
        tau, within a relative 2e-8 of the solution; the bracket's end when the target cannot
        be reached there (e.g. all centroids equal: the entropy is ``log2 k`` at every tau).

    Raises:
        ValueError: ``entropy_bits`` not in ``(0, log2 k)``.
    """
    _check_target(centroids.shape[1], entropy_bits, name)
    return _bisect(_EntropyCurve(x, centroids, max_points), entropy_bits)


# -- the configuration: numbers, or entropies to calibrate to -------------------------------------
#: Default start: the soft assignments' mean entropy at DKM start, as a fraction of ``log2 k``.
DEFAULT_START_ENTROPY = 0.1
#: Default end: the mean entropy (bits) the last soft step anneals to (near-hard assignments).
DEFAULT_END_ENTROPY = 1e-2
AUTO = "auto"
INTERVALS = ("step", "epoch")


class TemperatureMapping(TypedDict, total=False):
    """``temperature`` written as a mapping, e.g. ``{schedule: exponential, start: auto, end:
    auto}`` in a LightningCLI YAML: the fields of :class:`TemperatureConfig`, every one optional.

    A typed dict rather than ``dict[str, Any]``: jsonargparse checks each key and value when it
    parses the YAML and writes the mapping back as it was given (``--print_config``, the
    ``config.yaml`` that LightningCLI saves), so the printed config runs again.
    """

    schedule: str | Callable[[int], float]
    start: float | Literal["auto"] | None
    end: float | Literal["auto"] | None
    interval: Literal["step", "epoch"]
    start_entropy: float
    end_entropy: float
    step_size: int | None
    gamma: float | None


_KEYS = tuple(TemperatureMapping.__annotations__)


def _is_custom(schedule: object) -> bool:
    """Whether ``schedule`` is a custom callable (an import path or an object): no bounds."""
    return is_import_path(schedule) or callable(schedule)


def _describe(fn: Callable[..., Any]) -> str:
    """A primitive name for a schedule given as an object (what the checkpoint records of it)."""
    if isinstance(fn, TemperatureSchedule):
        return repr(fn)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


@dataclass(frozen=True)
class TemperatureConfig:
    """How tau moves during DKM: a schedule shape, its two ends, and how often it moves.

    ``start`` / ``end`` are numbers (tau in units of each palette's weight variance, the same for
    every tensor) or ``"auto"``: calibrated for each tensor when DKM starts, to the tau at which
    its soft assignments have mean entropy ``start_entropy * log2 k`` (start) or ``end_entropy``
    bits (end), see :func:`temperature_for_entropy`. ``interval="step"`` moves tau every
    optimizer step, ``"epoch"`` at the start of every epoch.

    ``schedule`` may also be a callable ``unit -> tau``, by import path or as an object (a
    :class:`~lightning_dkm.lightning.schedules.TemperatureSchedule`, or any callable, whose
    every tau is checked): its tau is its own for every tensor, no ``start`` / ``end``; an
    object is called with unit 0 when the config is built, and saved in checkpoints by name
    only (``DKMCallback``'s ``temperature`` says what that asks of it).

    :meth:`parse` builds one from what a user writes: a number (a constant tau), ``"auto"``
    (the default: exponential from ``"auto"`` to ``"auto"`` every step), a callable, or a
    mapping of the fields below. A config is checked when it is built (:meth:`check`).
    """

    schedule: str | Callable[[int], float] = "exponential"
    start: float | str | None = AUTO
    end: float | str | None = AUTO
    interval: str = "step"
    start_entropy: float = DEFAULT_START_ENTROPY
    end_entropy: float = DEFAULT_END_ENTROPY
    step_size: int | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def parse(cls, value: object) -> TemperatureConfig:
        """The config for ``value`` (``None`` / ``"auto"``, a number, a callable, a mapping or a
        config), validated: a ``ValueError`` names the bad key and value and what is allowed."""
        if value is None or value == AUTO:
            return cls()
        if isinstance(value, TemperatureConfig):
            return value
        if callable(value):
            return cls(schedule=value, start=None, end=None)
        if is_number(value):
            return cls(schedule="constant", start=float(value), end=None)
        if not isinstance(value, Mapping):
            raise ValueError(
                "temperature must be 'auto', a number (a constant tau), a mapping like "
                "{schedule: exponential, start: auto, end: auto, interval: step}, a "
                f"TemperatureSchedule or a callable unit -> tau; got {value!r}"
            )
        if callable(value.get("schedule")):
            extra = sorted(set(value) - {"schedule", "interval"})
            if extra:
                raise ValueError("temperature: with a callable schedule only 'interval' may be "
                                 f"given (the callable's tau is its own); got also {extra}")
        check_keys("temperature", value, _KEYS)
        fields = dict(value)
        if "schedule" not in fields:
            # A mapping with only a start is a constant; with an end (or nothing), annealed.
            constant = "start" in fields and "end" not in fields
            fields["schedule"] = "constant" if constant else "exponential"
        if fields["schedule"] in ("constant", "step") and "end" not in fields:
            fields["end"] = None  # a constant has none; a step schedule's is an optional clamp
        if _is_custom(fields["schedule"]):  # a callable's tau is its own: no bounds
            fields.setdefault("start", None)
            fields.setdefault("end", None)
        return cls(**fields)

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first invalid field."""
        if callable(self.schedule):
            try:
                self.schedule_for((1.0, 1.0), None)(0)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"temperature={self.schedule!r}: calling it with unit 0 failed ({err}); a "
                    "callable temperature takes the soft DKM step or epoch (an int >= 0, counted "
                    "from the first) and returns tau, a finite number > 0"
                ) from err
        elif not isinstance(self.schedule, str) or (
            self.schedule not in SCHEDULE_NAMES and not is_import_path(self.schedule)
        ):
            raise ValueError(
                f"temperature.schedule must be one of {SCHEDULE_NAMES} or the import path of a "
                f"callable step/epoch -> tau ('package.module.function'); got {self.schedule!r}"
            )
        for key in ("start", "end"):
            value = getattr(self, key)
            if value is None and (key == "end" or _is_custom(self.schedule)):
                continue
            if value == AUTO:
                if self.schedule not in (*ANNEALED_SCHEDULES, "constant"):
                    raise ValueError(
                        f"temperature.{key}='auto' needs a constant, linear, exponential or "
                        f"cosine schedule; got schedule={self.schedule!r} (give numbers)"
                    )
                continue
            if not is_number(value) or not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"temperature.{key} must be 'auto' or a finite number > 0 (tau in units of "
                    f"the weight variance); got {value!r}"
                )
        if self.annealed and self.end is None:
            raise ValueError(
                f"temperature.end is required by schedule={self.schedule!r}: a number or 'auto'"
            )
        if self.interval not in INTERVALS:
            raise ValueError(
                f"temperature.interval must be one of {INTERVALS}; got {self.interval!r}"
            )
        if not is_number(self.start_entropy) or not 0 < self.start_entropy < 1:
            raise ValueError(
                "temperature.start_entropy must be a fraction of log2 k in (0, 1); got "
                f"{self.start_entropy!r}"
            )
        if not is_number(self.end_entropy) or not 0 < self.end_entropy < math.inf:
            raise ValueError(
                "temperature.end_entropy must be a number of bits > 0; got "
                f"{self.end_entropy!r} (it must be finite)"
            )
        if not callable(self.schedule):
            # Build the schedule now (its step_size / gamma, an import path resolved), with a
            # stand-in 1.0 for an "auto" bound: else a mistake would surface at the first soft
            # step, after start_epoch epochs of training.
            bound = {key: 1.0 if value in (None, AUTO) else value
                     for key, value in (("start", self.start), ("end", self.end))}
            try:
                self.schedule_for((bound["start"], bound["end"]), 1)
            except ValueError as err:
                raise ValueError(f"temperature: {err}") from err

    @property
    def annealed(self) -> bool:
        """Whether the schedule is one of the annealed named ones (a callable is not)."""
        return isinstance(self.schedule, str) and self.schedule in ANNEALED_SCHEDULES

    @property
    def anneals(self) -> bool:
        """Whether tau moves from start to end (a schedule over a known number of steps)."""
        return self.annealed and (self.calibrates or self.start != self.end)

    @property
    def calibrates(self) -> bool:
        """Whether a tensor's taus depend on its weights (an ``"auto"`` end)."""
        return AUTO in (self.start, self.end)

    def bounds(self, x: Tensor, centroids: Tensor, name: str = "weight") -> tuple[float, float]:
        """``(start, end)`` tau of one tensor (palettes ``x``, ``centroids``): the numbers, or
        the calibrated taus for ``"auto"``. Without an end, ``end == start``; a callable
        schedule's are unused (1.0)."""
        if self.start is None:
            return 1.0, 1.0
        top = math.log2(centroids.shape[1])
        # one curve for both ends: its distances and common evaluations shared
        curve = _EntropyCurve(x, centroids, DEFAULT_MAX_POINTS) if self.calibrates else None

        def tau(value: float | str, entropy_bits: float) -> float:
            if value != AUTO:
                return float(value)
            assert curve is not None
            _check_target(centroids.shape[1], entropy_bits, name)
            return _bisect(curve, entropy_bits)

        start = tau(self.start, self.start_entropy * top)
        if self.end is None:
            return start, start
        return start, tau(self.end, self.end_entropy_for(centroids.shape[1]))

    def end_entropy_for(self, k: int) -> float:
        """The end's target entropy (bits) for ``k`` centroids: ``end_entropy``, at most half
        of ``log2 k`` (an end nearly as soft as uniform assignments would not anneal toward
        the hard ones that finalize snaps to; :meth:`TemperaturePlan.calibrate` warns where
        it caps)."""
        return min(self.end_entropy, 0.5 * math.log2(k))

    def schedule_for(
        self, bounds: tuple[float, float], num_units: int | None
    ) -> TemperatureSchedule:
        """The ``unit -> tau`` schedule (a unit is a step or an epoch, ``interval``) of a tensor
        with these ``bounds`` over ``num_units`` soft units (an object schedule: itself, or
        the callable wrapped so that every tau it returns is checked)."""
        if isinstance(self.schedule, TemperatureSchedule):
            return self.schedule
        if callable(self.schedule):
            return CallableSchedule(fn=self.schedule)
        extra = {k: v for k, v in (("step_size", self.step_size), ("gamma", self.gamma))
                 if v is not None}
        start, end = bounds
        return build_schedule(
            self.schedule, start=start, end=None if self.end is None else end,
            num_units=num_units, **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """Primitives only: an object schedule by name."""
        if callable(self.schedule):
            return {"schedule": "callable", "fn": _describe(self.schedule),
                    "interval": self.interval}
        return asdict(self)


class TemperaturePlan:
    """Every clustered tensor's tau at every soft unit (step or epoch) of a fit.

    ``calibrate`` fixes each tensor's ``(start, end)`` bounds when DKM starts (from its palettes
    and centroids for ``"auto"`` ends, else the config's numbers); ``set_units`` gives the number
    of soft units the schedule spans; ``taus(unit)`` is then each tensor's tau at that unit (0 is
    the first soft unit). The bounds are the state a resume needs (``state_dict``): they were
    calibrated on the weights as they were when DKM started, not as they are at the resume.
    """

    def __init__(self, config: TemperatureConfig) -> None:
        self.config = config
        self.bounds: dict[str, tuple[float, float]] = {}
        self.num_units: int | None = None
        self._schedules: dict[str, TemperatureSchedule] = {}

    def calibrate(self, palettes: Mapping[str, tuple[Tensor, Tensor]]
                  | Iterable[tuple[str, tuple[Tensor, Tensor]]]) -> None:
        """Bounds for every tensor in ``palettes`` (name -> (palettes ``x``, centroids), or such
        pairs one at a time: a generator that reads each weight only when it is calibrated)
        that has none yet; one warning names the tensors whose ``"auto"`` end ``end_entropy``
        is capped for (above half of their ``log2 k``:
        :meth:`TemperatureConfig.end_entropy_for`)."""
        capped: dict[str, int] = {}
        items = palettes.items() if isinstance(palettes, Mapping) else palettes
        for name, (x, centroids) in items:
            if name not in self.bounds:
                k = centroids.shape[1]
                if self.config.end == AUTO and self.config.end_entropy_for(k) < (
                        self.config.end_entropy):
                    capped[name] = k
                self.bounds[name] = self.config.bounds(x, centroids, name)
                self._schedules.pop(name, None)
        if capped:
            shown = ", ".join(f"{name} (k={k}: {self.config.end_entropy_for(k):g} bits)"
                              for name, k in list(capped.items())[:8])
            more = f" and {len(capped) - 8} more" if len(capped) > 8 else ""
            warnings.warn(
                f"temperature.end_entropy={self.config.end_entropy:g} bits is above half of "
                f"log2 k for {len(capped)} tensor(s), whose end tau is calibrated to half of "
                f"log2 k instead: {shown}{more}; an end_entropy below that silences this",
                UserWarning, stacklevel=2)

    def set_units(self, num_units: int | None) -> None:
        """The number of soft units (``None``: open-ended, only for schedules that allow it)."""
        if num_units != self.num_units:
            self.num_units = num_units
            self._schedules.clear()

    def taus(self, unit: int) -> dict[str, float]:
        """Each calibrated tensor's tau at soft ``unit`` (``>= 0``)."""
        return {name: self._schedule(name)(unit) for name in self.bounds}

    def _schedule(self, name: str) -> TemperatureSchedule:
        if name not in self._schedules:
            self._schedules[name] = self.config.schedule_for(self.bounds[name], self.num_units)
        return self._schedules[name]

    def state_dict(self) -> dict[str, Any]:
        return {"bounds": {name: list(b) for name, b in self.bounds.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bounds = {name: (float(b[0]), float(b[1])) for name, b in state["bounds"].items()}
        self._schedules.clear()


def geometric_mean(values: Mapping[str, float]) -> float:
    """The geometric mean of positive values (the one tau the progress bar shows for many)."""
    return math.exp(sum(math.log(v) for v in values.values()) / len(values))
