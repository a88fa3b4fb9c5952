"""When DKM runs during a fit, and with what tau.

:class:`DKMTimeline` is the schedule side of :class:`~lightning_dkm.DKMCallback`: the mode of
every epoch (``dense`` before ``start_epoch``, then what the method says: DKM ``soft`` and from
``hard_epoch`` ``hard``), the moment DKM starts (centroids seeded, each tensor's tau bounds
calibrated), and every tensor's tau at each soft unit: an optimizer step (``interval="step"``,
set at each batch start) or an epoch (``"epoch"``, at each epoch start). Tau lives in each
parametrization's buffer and is set in place (``fill_``), so a compiled module never recompiles
for it. The state a resume needs is the plan's calibrated bounds; the unit itself is derived
from the restored step or epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from ..engine.kmeans import waves
from ..engine.parametrization import initialize_many
from ..model.attach import ClusteredTensor
from ..model.methods import ClusteringMethod
from .preflight import soft_units
from .temperature import TemperatureConfig, TemperaturePlan, geometric_mean

__all__ = ["DKMTimeline"]


class DKMTimeline:
    """Modes and taus of one callback's tensors over a fit (module docstring)."""

    def __init__(
        self,
        temperature: TemperatureConfig,
        method: ClusteringMethod,
        start_epoch: int,
        hard_epoch: int | None,
    ) -> None:
        self.temperature = temperature
        self.method = method
        self.start_epoch = start_epoch
        self.hard_epoch = hard_epoch
        self.plan = TemperaturePlan(temperature)
        self.taus: dict[str, float] = {}  # the tau in force per tensor
        self._unit: int | None = None  # the step unit whose taus are set (None: unknown)
        self.start_step = 0  # the optimizer step at which DKM starts (interval "step")

    def mode(self, epoch: int) -> str:
        return self.method.mode_for_epoch(epoch, self.start_epoch, self.hard_epoch)

    def active(self, epoch: int) -> bool:
        """Whether clustering runs in ``epoch`` (Deep k-Means is active in mode "dense")."""
        return epoch >= self.start_epoch

    @property
    def tau(self) -> float:
        """The tau shown as ``dkm/tau``: the geometric mean over tensors (equal on all ranks)."""
        return geometric_mean(self.taus)

    def begin(self, tensors: Mapping[str, ClusteredTensor]) -> None:
        """DKM starts: seed the centroids still unseeded, then fix each tensor's tau bounds
        (:meth:`_started`)."""
        self.plan.calibrate(self._started(tensors))
        self._unit = None

    def _started(self, tensors: Mapping[str, ClusteredTensor]
                 ) -> Iterator[tuple[str, tuple[Tensor, Tensor]]]:
        """Seeds the tensors' unseeded centroids and yields ``(name, (palettes, centroids))``
        for those without tau bounds, a wave of at most :data:`~..engine.kmeans.WAVE_WEIGHTS`
        weights at a time (:func:`~..engine.kmeans.waves`): each weight is read once for both,
        so FSDP2 gathers it once, and at most a wave of gathered weights is held at once (not
        the whole model on every rank)."""
        pending = [(name, t) for name, t in tensors.items()
                   if not t.parametrization.is_initialized or name not in self.plan.bounds]
        for run in waves([math.prod(t.parametrization.layout.shape) for _, t in pending]):
            weights = {i: pending[i][1].full_original() for i in run}
            initialize_many([(pending[i][1].parametrization, lambda w=weights[i]: w)
                             for i in run if not pending[i][1].parametrization.is_initialized])
            for i in run:
                name, t = pending[i]
                if name not in self.plan.bounds:
                    yield name, (t.parametrization.to_palettes(weights[i]),
                                 t.parametrization.centroids)

    def on_train_start(self, trainer: pl.Trainer) -> None:
        """The number of soft units the schedule spans, now that the dataloaders are known."""
        units, self.start_step = soft_units(
            trainer, self.temperature.interval, self.start_epoch, self.hard_epoch
        )
        self.plan.set_units(units)
        self._unit = None

    def on_epoch_start(self, epoch: int, tensors: Mapping[str, ClusteredTensor]) -> bool:
        """Mode for the epoch; at ``start_epoch`` DKM begins; with interval "epoch" the epoch's
        taus. Returns whether an epoch tau was set (to be logged)."""
        mode = self.mode(epoch)
        uses_tau = self.method.uses_temperature
        if self.active(epoch) and tensors:
            self.begin(tensors)
            if not uses_tau:  # tau only sets where the entropy metric is measured: the start
                self._set_taus(tensors, 0)
            elif self.temperature.interval == "epoch":
                self._set_taus(tensors, epoch - self.start_epoch)
        for tensor in tensors.values():
            tensor.parametrization.set_mode(mode)  # type: ignore[arg-type]
        return bool(uses_tau and mode != "dense" and self.taus
                    and self.temperature.interval == "epoch")

    def on_step(
        self, global_step: int, epoch: int,
        tensors: Callable[[], Mapping[str, ClusteredTensor]],
    ) -> bool:
        """Interval "step": every tensor's tau for this optimizer step (``tensors()`` is only
        looked up then); nothing when they are set already (the other micro-batches of an
        accumulation window). Returns whether they were set (to be logged)."""
        if (
            self.temperature.interval != "step"
            or not self.method.uses_temperature
            or self.mode(epoch) != "soft"
        ):
            return False
        unit = max(global_step - self.start_step, 0)
        if unit == self._unit:
            return False
        found = tensors()
        if not found:
            return False
        self._set_taus(found, unit)
        self._unit = unit
        return True

    def _set_taus(self, tensors: Mapping[str, ClusteredTensor], unit: int) -> None:
        """Every tensor's tau at ``unit``, written into the parametrizations' buffers by one
        fused op per device (``torch._foreach_*``: no per-tensor op, nothing read back; each
        value was checked by its schedule)."""
        try:
            self.taus = self.plan.taus(unit)
        except ValueError as err:
            raise MisconfigurationException(f"DKMCallback temperature: {err}") from err
        self._unit = None  # a step unit set from on_step only
        by_device: dict[torch.device, tuple[list[Tensor], list[float]]] = {}
        for name, tensor in tensors.items():
            buffer = tensor.parametrization.temperature
            buffers, values = by_device.setdefault(buffer.device, ([], []))
            buffers.append(buffer)
            values.append(self.taus[name])
        with torch.no_grad():
            for buffers, values in by_device.values():
                torch._foreach_zero_(buffers)
                torch._foreach_add_(buffers, values)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], saved_config: Mapping | None) -> None:
        """The checkpoint's bounds; ``saved_config`` (the temperature it was written with, as
        primitives) must be of the same kind: calibrated or numeric bounds, or a callable's."""
        if saved_config is not None and (
            (saved_config.get("start") is None) != (self.temperature.start is None)
        ):
            raise MisconfigurationException(
                f"DKMCallback: the checkpoint was written with temperature {dict(saved_config)}, "
                f"whose saved tau bounds do not apply to temperature "
                f"{self.temperature.to_dict()}; resume with a temperature of the same kind (a "
                "callable or import path, or numbers / 'auto')"
            )
        self.plan.load_state_dict(state)
        self._unit = None
