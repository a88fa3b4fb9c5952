"""What :class:`~lightning_dkm.DKMCallback` accepts, checked when it is constructed.

Every check raises a ``ValueError`` that names the argument, the value and what is allowed, so a
typo in a LightningCLI YAML fails before the Trainer is built, not epochs later. Besides the
config-friendly forms (names, numbers, mappings), ``temperature`` and ``method`` take objects,
as Lightning's own callbacks do: a :class:`~lightning_dkm.lightning.schedules.TemperatureSchedule`
or any callable ``unit -> tau`` (:func:`parse_temperature`), a
:class:`~lightning_dkm.model.methods.ClusteringMethod` instance (:func:`resolve_method`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ..engine.layout import ClusterSpec, is_int, is_number
from ..engine.parametrization import check_implementation
from ..engine.weighted import check_gradient
from ..model.bit_budget import ALL_WIDTHS, DEFAULT_BITS, check_budget
from ..model.methods import (
    DEFAULT_REFRESH_EVERY,
    DEFAULT_REGULARIZATION,
    METHOD_NAMES,
    ClusteringMethod,
    DeepKMeansMethod,
    DKMMethod,
    HardMethod,
    build_method,
)
from ..model.targets import override_specs
from .schedules import TemperatureSchedule
from .temperature import TemperatureConfig, TemperatureMapping

__all__ = [
    "DEFAULT_BITS",
    "TemperatureArgument",
    "check_arguments",
    "check_callback_budget",
    "check_method_options",
    "parse_temperature",
    "require",
    "resolve_method",
]


def check_callback_budget(
    bits: int | None, average_bits: object, allowed_bits: object, export_coreai: bool
) -> tuple[float | None, tuple[int, ...]]:
    """:func:`~lightning_dkm.model.bit_budget.check_budget` for ``DKMCallback``: the widths
    ``average_bits`` may choose are ``allowed_bits``, or 1..8, or with ``export_coreai`` Core AI's
    (:data:`~lightning_dkm.export.coreai.COREAI_BITS`; given widths it cannot pack are an
    error)."""
    from ..export.coreai import COREAI_BITS

    budget, widths = check_budget(bits, average_bits, allowed_bits,
                                  COREAI_BITS if export_coreai else ALL_WIDTHS)
    bad = sorted(set(widths) - set(COREAI_BITS)) if export_coreai else []
    require(not bad, f"allowed_bits={allowed_bits!r} holds {bad}, which Core AI cannot pack "
                     f"(export_coreai=True packs {list(COREAI_BITS)}); leave allowed_bits unset")
    return budget, widths


def require(ok: bool, message: str) -> None:
    """``ValueError(message)`` unless ``ok``: the one-line checks of the constructor."""
    if not ok:
        raise ValueError(message)


def _refuse_class(argument: str, value: object, allowed: str, example: str) -> None:
    """``ValueError`` when ``value`` is a class where an instance is wanted (a YAML or a call
    that forgot the parentheses), naming what ``argument`` takes and an ``example``."""
    if isinstance(value, type):
        raise ValueError(f"{argument} must be {allowed}, not the class {value.__name__}; "
                         f"e.g. {example}")


# -- temperature --------------------------------------------------------------------------------
#: The type of ``DKMCallback(temperature=...)``: each form a YAML can give has a member that
#: jsonargparse parses and writes back (``--print_config``, LightningCLI's ``config.yaml``):
#: a number, ``"auto"``, a :class:`~.temperature.TemperatureMapping`, a
#: :class:`TemperatureSchedule` as ``class_path`` / ``init_args``, or the import path of a
#: callable ``unit -> tau``. The callable comes last on purpose: jsonargparse writes any value
#: that reaches it as an import path (a mapping as ``'Unable to serialize instance ...'``), so
#: every other form must be matched first. No plain ``str`` (it would take an import path as a
#: string) and no ``dict[str, Any]`` (it would take a ``class_path`` mapping as a plain dict).
TemperatureArgument = (
    float | Literal["auto"] | TemperatureMapping | TemperatureSchedule | Callable[[int], float]
    | None
)


def parse_temperature(value: object) -> TemperatureConfig:
    """The validated temperature of any form ``DKMCallback(temperature=...)`` accepts
    (:meth:`TemperatureConfig.parse`), a schedule class given where an instance is wanted
    refused by name."""
    schedule = value.get("schedule") if isinstance(value, Mapping) else value
    _refuse_class("temperature", schedule, "an instance",
                  "ExponentialSchedule(start=1e-1, end=1e-3, num_units=1000)")
    return TemperatureConfig.parse(value)


# -- method ---------------------------------------------------------------------------------------
def resolve_method(
    method: str | ClusteringMethod,
    regularization: float = DEFAULT_REGULARIZATION,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
) -> ClusteringMethod:
    """The :class:`ClusteringMethod` that ``method`` names, or ``method`` itself.

    An instance is used as it is (the callback drives it and its state is the run's); it must
    have a ``name`` (saved in checkpoints, compared on resume) and implement ``mode_for_epoch``,
    and ``regularization`` / ``refresh_every`` must stay at their defaults: they configure the
    method built from a name, an instance carries its own.
    """
    _refuse_class("method", method, "a name or an instance",
                  "method=DeepKMeansMethod(regularization=1e-2)")
    if isinstance(method, ClusteringMethod):
        require(isinstance(method.name, str) and bool(method.name),
                f"method={method!r} needs a non-empty `name` (it is saved in checkpoints)")
        require(type(method).mode_for_epoch is not ClusteringMethod.mode_for_epoch,
                f"method={method!r} must implement mode_for_epoch(epoch, start_epoch, "
                "hard_epoch) -> 'soft' | 'hard' | 'dense'")
        changed = [
            f"{name}={value!r}" for name, value, default in (
                ("regularization", regularization, DEFAULT_REGULARIZATION),
                ("refresh_every", refresh_every, DEFAULT_REFRESH_EVERY),
            ) if value != default
        ]
        require(not changed, f"{', '.join(changed)} only configure a method given by name; "
                             f"method={method!r} is an instance: set them on it (e.g. "
                             "DeepKMeansMethod(regularization=..., refresh_every=...))")
        return method
    require(isinstance(method, str) and method in METHOD_NAMES,
            f"method must be one of {METHOD_NAMES} or a ClusteringMethod instance "
            f"(lightning_dkm.model.methods); got {method!r}")
    # the values checked first (a bad one is named as bad), then whether the method uses them
    built = build_method(method, regularization=regularization, refresh_every=refresh_every)
    for name, value, default in (("regularization", regularization, DEFAULT_REGULARIZATION),
                                 ("refresh_every", refresh_every, DEFAULT_REFRESH_EVERY)):
        require(method == "deep_kmeans" or value == default,
                f"{name}={value!r} only applies to method='deep_kmeans'; got method={method!r} "
                f"(leave {name} at its default, {default!r})")
    return built


def check_method_options(
    method: ClusteringMethod, hard_epoch: int | None, gradient: str, implementation: str
) -> None:
    """The options that only some methods use: ``hard_epoch`` (not for ``hard`` and
    ``deep_kmeans``, which ignore it) and ``gradient="implicit"`` (DKM's soft step only, with
    a step that computes it)."""
    check_gradient(gradient, implementation, "DKMCallback")
    require(hard_epoch is None or not isinstance(method, (HardMethod, DeepKMeansMethod)),
            f"hard_epoch={hard_epoch!r} only applies to method='dkm'; got method={method.name!r}")
    require(gradient != "implicit" or isinstance(method, DKMMethod),
            "DKMCallback: gradient='implicit' is the gradient of DKM's soft step and needs "
            f"method='dkm'; got method={method.name!r}")


def check_arguments(
    *,
    spec: ClusterSpec,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    min_size: object,
    start_epoch: object,
    hard_epoch: object,
    max_iter: object,
    epsilon: object,
    implementation: object,
    export_coreml: object,
    export_coreai: object,
    seed: object,
    save_dir: object,
    switches: Mapping[str, object],
) -> None:
    """The constructor's plain arguments: types and ranges; each ``overrides`` entry against
    ``spec`` (unknown keys, bad values) now rather than when ``setup`` selects the targets;
    ``switches``: the other ``bool`` arguments by name."""
    override_specs(spec, overrides)
    require(is_int(min_size, 0), f"min_size must be an int >= 0; got {min_size!r}")
    require(is_int(start_epoch, 0), f"start_epoch must be an int >= 0; got {start_epoch!r}")
    require(hard_epoch is None or (is_int(start_epoch, 0) and is_int(hard_epoch, start_epoch)),
            f"hard_epoch must be None or an int >= start_epoch ({start_epoch}); got "
            f"{hard_epoch!r}")
    require(is_int(max_iter, 1), f"max_iter must be an int >= 1; got {max_iter!r}")
    # inf would stop every DKM loop after its first iteration (no centroid moves more), nan none
    require(is_number(epsilon) and math.isfinite(epsilon) and epsilon >= 0,
            f"epsilon must be a finite number >= 0 (the early-stop tolerance in weight standard "
            f"deviations; 0 always runs max_iter iterations); got {epsilon!r}")
    check_implementation(implementation)
    require(is_int(seed), f"seed must be an int; got {seed!r}")
    require(save_dir is None or (isinstance(save_dir, (str, os.PathLike))
                                 and os.fspath(save_dir) != ""),
            f"save_dir must be None (the trainer's log_dir + /dkm) or a non-empty path; got "
            f"{save_dir!r}")
    for name, value in (("export_coreml", export_coreml), ("export_coreai", export_coreai),
                        *switches.items()):
        require(isinstance(value, bool), f"{name} must be True or False; got {value!r}")
