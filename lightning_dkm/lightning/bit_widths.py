"""``DKMCallback(average_bits=...)`` in a fit: the sensitivities from a few training batches,
the widths chosen on rank 0 and broadcast, and where the allocation is shown.

The allocation itself (estimates, budget, knapsack) is :mod:`lightning_dkm.model.bit_budget`;
this module only brings it what a fit has: the ``LightningModule``'s ``training_step`` as the
loss whose Hessian diagonal weighs the estimate
(:func:`~lightning_dkm.model.post_training.allocation_curvature`), on the first
:data:`SENSITIVITY_BATCHES` batch of the training dataloader (through Lightning's batch
hooks, as ``training_step`` gets it; its first
:data:`SENSITIVITY_SAMPLES` samples; ``None``: all), at ``setup`` (before the optimizer and
DDP see the model, when the widths must be fixed; a loss without a double backward gets it by
finite differences). Where no Hessian can be had (manual optimization, no dataloader at
setup, a loss without any gradient of the weights) the widths are
uniform (:func:`~lightning_dkm.model.bit_budget.uniform_allocation`), with a warning naming
``average_bits`` and why; so they are under FSDP2 (:data:`FULLY_SHARDED_WIDTHS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..engine.numerics import random_states_kept
from ..engine.palette import stored_bytes
from ..model.bit_budget import (
    SENSITIVITY_BATCHES,
    SENSITIVITY_SAMPLES,
    UNIFORM,
    BitAllocation,
    plan_widths,
    uniform_allocation,
)
from ..model.post_training import allocation_curvature
from ..model.targets import Target

__all__ = ["FULLY_SHARDED_WIDTHS", "SENSITIVITY_BATCHES", "SENSITIVITY_SAMPLES", "log_allocation",
           "plan_fit_widths", "warn_if_allocated_otherwise"]

#: Why there is no sensitivity under FSDP2: the widths are fixed at ``setup``, before
#: ``fully_shard`` runs, where a Hessian would need a whole model's forward and backward passes
#: on one rank (what FSDP2 is used to avoid) and ``training_step`` outside the sharded model.
FULLY_SHARDED_WIDTHS = ("under FSDP2 no Hessian is computed at setup (it would need the whole, "
                        "unsharded model's forward and backward passes on one rank)")


@contextlib.contextmanager
def _logging_muted(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (``training_step`` run outside the
    loop, where Lightning would refuse them)."""
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log = noop  # type: ignore[method-assign]
    pl_module.log_dict = noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _training_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss ``training_step`` returns (a tensor, or a mapping's ``"loss"``)."""
    out = model.training_step(batch, 0)  # type: ignore[operator]
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out  # hessian_diagonal checks that it is a scalar tensor


def _train_batches(trainer: pl.Trainer) -> Any:
    """The fit's training dataloader as the user gave it (a ``DataLoader``, a datamodule's or
    the module's ``train_dataloader()``), or ``None`` where none can be had at setup."""
    source = getattr(trainer.fit_loop, "_data_source", None)  # Lightning 2.x: no public way
    if source is None or not source.is_defined():
        return None
    loader = source.dataloader()
    if isinstance(loader, (Mapping, list, tuple)):  # several dataloaders: no one batch order
        return None
    return loader


def _as_trained(pl_module: pl.LightningModule, loader: Any) -> Iterator[Any]:
    """``loader``'s batches as ``training_step`` receives them in the fit: through Lightning's
    batch hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``,
    ``on_after_batch_transfer``; the module's or the datamodule's), to the module's device."""
    for batch in loader:
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        yield pl_module._apply_batch_transfer_handler(batch, pl_module.device, dataloader_idx=0)


def _sensitivity(trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str],
                 seed: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The Hessian diagonal of ``names`` (Hutchinson) on the first samples of the training
    data and its label, or ``None`` and why it cannot be had."""
    if not pl_module.automatic_optimization:
        return None, ("the module uses manual optimization, whose training_step steps the "
                      "optimizer itself")
    try:
        loader = _train_batches(trainer)
    except Exception as err:  # a user's train_dataloader() that cannot run yet
        return None, f"the training dataloader could not be built at setup ({err})"
    if loader is None:
        return None, "no training dataloader is known at setup"
    try:
        with _logging_muted(pl_module):
            return allocation_curvature(pl_module, _as_trained(pl_module, loader),
                                        _training_loss, names,
                                        SENSITIVITY_BATCHES, SENSITIVITY_SAMPLES, seed=seed)
    except ValueError as err:
        return None, f"the training loss gave no sensitivity ({err})"


def plan_fit_widths(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    selected: list[Target],
    *,
    average_bits: float,
    allowed_bits: tuple[int, ...],
    fixed: Collection[str],
    lut_dtype: str,
    seed: int,
    no_sensitivity: str | None = None,
    at_configured_bytes: bool = False,
) -> BitAllocation:
    """The widths of ``selected`` under ``average_bits``: computed on rank 0 (weights as they
    are at setup, Hessian diagonal from the training batches) and broadcast, so every rank
    clusters with the same widths whatever data it sees. Whatever fails on rank 0 (the
    budget, or an error of ``training_step`` that is not a missing double backward) is
    broadcast too and raised on every rank, not on rank 0 alone while the others wait in the
    broadcast. ``fixed``: the names whose width an override fixes
    (:func:`~lightning_dkm.model.bit_budget.fixed_by_overrides`). ``no_sensitivity``: why
    no Hessian is to be computed (the widths are then uniform, with a warning).
    ``at_configured_bytes``: the budget is the bytes of ``selected`` at the widths they were
    selected with (``bits``, an override's own: ``average_bits="bits"``) instead of every
    tensor at ``average_bits``."""
    given = f"'bits' (bits={average_bits:g})" if at_configured_bytes else f"{average_bits:g}"
    allocation: dict[str, Any] | None = None
    error: str | None = None
    failure: Exception | None = None
    if trainer.global_rank == 0:
        try:
            modules = dict(pl_module.named_modules())
            weights = {t.name: getattr(modules[t.module_name], t.param_name) for t in selected}
            budget = (sum(stored_bytes(t.layout, lut_dtype) for t in selected)  # type: ignore[arg-type]
                      if at_configured_bytes else None)
            with random_states_kept():  # a seeded fit draws as without the allocation
                sensitivity, label = (None, no_sensitivity) if no_sensitivity else _sensitivity(
                    trainer, pl_module, [n for n in weights if n not in fixed], seed)
            if sensitivity is None:
                rank_zero_warn(f"DKMCallback(average_bits={given}): {label}; {UNIFORM}"
                               "; average_bits=None keeps every tensor at bits without this "
                               "warning")
                chosen = uniform_allocation(selected, weights, average_bits, label, fixed=fixed,
                                            allowed_bits=allowed_bits, lut_dtype=lut_dtype,
                                            seed=seed, budget=budget)
            else:
                chosen = plan_widths(
                    selected, weights, average_bits, fixed=fixed, sensitivity=sensitivity,
                    sensitivity_label=label, allowed_bits=allowed_bits,
                    lut_dtype=lut_dtype, seed=seed, budget=budget)
            allocation = chosen.to_dict()
        except ValueError as err:
            error = str(err)
        except Exception as err:  # raised as it is on rank 0 after the broadcast
            failure = err
            error = f"rank 0 failed to choose the widths ({type(err).__name__}: {err})"
    allocation, error = trainer.strategy.broadcast((allocation, error), src=0)
    if failure is not None:
        raise failure
    if error is not None:
        raise MisconfigurationException(f"DKMCallback(average_bits={given}): {error}")
    assert allocation is not None
    return BitAllocation.from_dict(allocation)


def log_allocation(trainer: pl.Trainer, allocation: BitAllocation, verbose: bool) -> None:
    """The allocation as TensorBoard text (``dkm/bit_allocation``) and, if ``verbose``,
    printed (rank 0)."""
    text = allocation.to_markdown()
    if trainer.global_rank == 0:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("dkm/bit_allocation", text, trainer.global_step)
    if verbose:
        rank_zero_info("DKMCallback bit allocation:\n" + text)


def warn_if_allocated_otherwise(
    allocation: BitAllocation,
    *,
    average_bits: float | None,
    allowed_bits: tuple[int, ...],
    lut_dtype: str,
    overrides: Mapping[str, Mapping[str, Any]],
) -> None:
    """On resume: one warning naming each setting the checkpoint's ``allocation`` was made
    under that differs now (checkpoint value vs. now), saying that the checkpoint's widths are
    kept. They must be: its centroids, originals and optimizer state are of those widths, and
    a resume continues the run exactly; new settings take effect in a fresh fit (no
    ``ckpt_path``). ``allowed_bits`` is compared only where a budget is set now (without one
    it chooses nothing), ``overrides`` only where the checkpoint recorded them."""
    def shown(value: object) -> str:
        return f"{value:g}" if isinstance(value, float) else repr(value)

    differ = [
        (name, before, now) for name, before, now, compared in (
            ("average_bits", allocation.average_bits, average_bits, True),
            ("allowed_bits", list(allocation.allowed_bits), list(allowed_bits),
             average_bits is not None),
            ("lut_dtype", allocation.lut_dtype, lut_dtype, True),
            ("overrides", allocation.overrides, {p: dict(o) for p, o in overrides.items()},
             allocation.overrides is not None),
        ) if compared and before != now
    ]
    if not differ:
        return
    widths = ", ".join(f"{name}: {bits}" for name, bits in allocation.bits.items())
    rank_zero_warn(
        "DKMCallback: the checkpoint's bit allocation was made with other settings than this "
        "callback's: " + "; ".join(f"{name}: checkpoint {shown(before)}, now {shown(now)}"
                                   for name, before, now in differ)
        + f". The checkpoint's allocation is kept ({widths} bits), so the resume stays exact; "
        "to allocate under the new settings, start a fresh fit without ckpt_path"
    )
