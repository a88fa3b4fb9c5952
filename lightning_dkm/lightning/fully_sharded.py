"""What :class:`~lightning_dkm.DKMCallback` does differently under FSDP2.

FSDP2 (``fully_shard``, applied by the user in ``configure_model`` under Lightning's
``ModelParallelStrategy``) turns each parameter into a ``DTensor`` shard after the callback's
``setup`` has registered the parametrizations (so FSDP2 shards their originals, and gathers
each one whole for its module's forward: every rank clusters the same gathered weight, so the
centroids agree without any extra communication). What changes:

* **Seeding** waits for the first training epoch (``on_train_epoch_start``), from the gathered
  weights: at ``setup`` each rank holds its own unsharded initialisation, which FSDP2 does not
  synchronise, so centroids seeded there could differ between ranks.
* **Checkpoints** keep the model's own state dict (the DKM keys: originals, centroids, tau):
  Lightning loads FSDP checkpoints, full and sharded, straight into the parametrized model with
  ``torch.distributed.checkpoint`` before any callback hook could translate plain weights.
* **Finalize** (:func:`~lightning_dkm.model.attach.finalize_sharded`) snaps every shard in place
  and keeps the parametrizations in mode ``"dense"`` (FSDP2 owns what they hold). The plain
  finalized model, the one finalize gives without FSDP, is rebuilt on rank 0 from a weightless
  copy of the module taken at ``setup`` (:mod:`lightning_dkm.model.skeleton`) and the gathered
  full state dict; the report, the artifact and the Core ML package come from it.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

from ..engine.palette import Palette
from ..model.attach import finalize_sharded
from ..model.carried import carry_palettes
from ..model.checkpoint import split_dkm_state
from ..model.skeleton import materialize, tensorless_copy
from .preflight import check_fully_sharded_model

__all__ = ["FullySharded"]


class FullySharded:
    """The FSDP2 side of one :class:`~lightning_dkm.DKMCallback` (module docstring)."""

    def __init__(self) -> None:
        self._skeleton: nn.Module | None = None

    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, finalize_at_fit_end: bool
    ) -> None:
        """At ``setup("fit")``, before the parametrizations are attached and before
        ``configure_model`` shards the model: check it, and on rank 0 keep its skeleton when
        fit ends with finalize."""
        check_fully_sharded_model(pl_module)
        self._skeleton = None
        if finalize_at_fit_end and trainer.global_rank == 0:
            mesh = pl_module.__dict__.get("_device_mesh")
            self._skeleton = tensorless_copy(pl_module, leave_out=[trainer, mesh])

    def finalize(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str]
    ) -> tuple[dict[str, Palette], nn.Module | None]:
        """Snap every rank's shards (collectives: every rank calls this) and return the palettes
        and, on rank 0, the finalized plain model carrying them (``None`` on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        palettes = finalize_sharded(pl_module, names)
        full = get_model_state_dict(
            pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )  # whole tensors on rank 0, nothing elsewhere
        if trainer.global_rank != 0:
            return palettes, None
        assert self._skeleton is not None, "setup keeps the skeleton on rank 0"
        plain, _ = split_dkm_state(pl_module, full, names)
        model, self._skeleton = materialize(self._skeleton, plain), None
        carry_palettes(model, palettes)
        return palettes, model
