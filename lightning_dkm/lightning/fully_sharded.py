"""What :class:`~lightning_dkm.DKMCallback` does differently under FSDP2 (``fully_shard`` in
``configure_model`` under Lightning's ``ModelParallelStrategy``); ``docs/distributed.md`` says
what and why. The callback itself seeds at the first training epoch (from the gathered weights)
and leaves checkpoints the model's own state dict; this module holds the steps with state:
the weightless copy of the module taken at ``setup`` (:mod:`lightning_dkm.model.skeleton`);
shard-local DKM (:mod:`lightning_dkm.engine.shard_local`) over each optimizer step, soft weights
written into the shards at the batch start and DKM's backward applied to the reduce-scattered
gradients before the step, the raw weights back in place after every batch; and finalize,
which snaps every shard in place (:func:`~lightning_dkm.model.attach.finalize_sharded`, the
parametrizations staying in mode ``"dense"``) and rebuilds the plain finalized model on rank 0
from that copy and the gathered full state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..engine.palette import Palette
from ..engine.shard_local import RawShards, ShardLocalDKM, eligible
from ..model.attach import ClusteredTensor, finalize_sharded
from ..model.carried import carry_palettes
from ..model.checkpoint import split_dkm_state
from ..model.skeleton import materialize, tensorless_copy
from .preflight import check_fully_sharded_model

__all__ = ["FullySharded"]


class FullySharded:
    """The FSDP2 side of one :class:`~lightning_dkm.DKMCallback` (module docstring)."""

    def __init__(self) -> None:
        self._skeleton: nn.Module | None = None
        # the optimizer step's shard-local DKM, one per device mesh (units sharded on
        # different meshes: e.g. one with a dim name and ``fully_shard``'s default)
        self._steps: list[ShardLocalDKM] = []
        # the raw shards' memory, reused by every step of an epoch (released by drop)
        self._raw_shards = RawShards()
        self._warned: set[str] = set()  # weights already named in a "gathered" warning

    # -- shard-local DKM over one optimizer step ----------------------------------------------
    def start_batch(self, pl_module: pl.LightningModule,
                    tensors: Mapping[str, ClusteredTensor]) -> None:
        """At a training batch's start: at an optimizer step's first (micro-)batch, DKM of
        every eligible weight's shards (:meth:`~.ShardLocalDKM.soften`, collectives); at the
        step's later micro-batches the same soft values again (:meth:`~.ShardLocalDKM.reapply`,
        no DKM). Weights in soft training that cannot go shard-local keep clustering the
        gathered weight in the forward; each is named once in a warning saying why."""
        if self._steps:
            for step in self._steps:
                step.reapply()
            return
        soft = {n: t for n, t in tensors.items() if t.parametrization.mode == "soft"
                and t.parametrization.training and t.parametrization.is_initialized}
        if not soft:
            return
        if not pl_module.automatic_optimization:
            self._warn(list(soft), "manual optimisation gives no optimizer step to apply DKM's "
                       "backward before")
            return
        chosen, reasons = [], {}
        for name, t in soft.items():
            reason = eligible(t.parametrization, t.original)
            if reason is None:
                chosen.append((name, t.parametrization, t.original))
            else:
                reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            self._warn(names, reason)
        meshes: list[tuple[object, list]] = []  # in the tensors' order: the same on every rank
        for weight in chosen:
            mesh = weight[2].device_mesh
            same = next((members for m, members in meshes if m == mesh), None)
            if same is None:
                meshes.append((mesh, [weight]))
            else:
                same.append(weight)
        self._steps = [ShardLocalDKM(members, self._raw_shards) for _, members in meshes]
        for step in self._steps:
            step.soften()

    def _warn(self, names: list[str], reason: str) -> None:
        new = [n for n in names if n not in self._warned]
        if new:
            self._warned.update(new)
            rank_zero_warn(f"DKMCallback under FSDP2: {new} are clustered from the gathered "
                           f"weight in each forward (O(n) per rank, not shard-local) because "
                           f"{reason}")

    def before_optimizer_step(self) -> None:
        """The step's gradients are complete: DKM's backward on every shard, raw weights
        back (:meth:`~.ShardLocalDKM.finish`, collectives); the next batch starts a new step."""
        steps, self._steps = self._steps, []
        try:
            for step in steps:
                step.finish()
        finally:  # where a finish raised, the later meshes' raw weights back too
            for step in steps:
                step.restore()

    def end_batch(self) -> None:
        """After a training batch: the raw weights back in the shards (validation, metrics,
        checkpoints see them); an accumulation window's tables stay for its next micro-batch."""
        for step in self._steps:
            step.restore()

    def drop(self) -> None:
        """The raw weights back and the step forgotten (an exception, an epoch or fit end
        without the optimizer step); the memory kept for the raw shards let go."""
        steps, self._steps = self._steps, []
        failures = []
        for step in steps:  # every mesh's raw weights back, even where one restore raised
            try:
                step.restore()
            except Exception as failure:  # raised below, after the others
                failures.append(failure)
        self._raw_shards.release()
        if failures:
            raise failures[0]

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
