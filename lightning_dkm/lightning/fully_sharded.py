"""What :class:`~lightning_dkm.DKMCallback` does differently under FSDP2 (``fully_shard`` in
``configure_model`` under Lightning's ``ModelParallelStrategy``); ``docs/distributed.md`` says
what and why. The callback itself seeds at the first training epoch (from the gathered weights)
and leaves checkpoints the model's own state dict; this module holds the two steps with state:
the weightless copy of the module taken at ``setup`` (:mod:`lightning_dkm.model.skeleton`), and
finalize, which snaps every shard in place (:func:`~lightning_dkm.model.attach.finalize_sharded`,
the parametrizations staying in mode ``"dense"``) and rebuilds the plain finalized model on rank
0 from that copy and the gathered full state dict.
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
