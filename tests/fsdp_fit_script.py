"""Fit a small MLP with DKMCallback under FSDP2 or DDP on 2 CPU processes (gloo).

Run as ``python fsdp_fit_script.py OUT_DIR STRATEGY [options]`` (Lightning's launcher re-runs
this script for rank 1). ``STRATEGY``: ``fsdp`` (``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``fully_shard`` on every Linear and the root in
``configure_model``) or ``ddp``. Both see the same global batches (2 x 16 samples per step from
one ``DistributedSampler`` order), so their fits agree up to float rounding. Each rank saves its
centroids (``centroids_rank{r}.pt``); rank 0 saves ``result.pt`` (the artifact path, the
palettes' weights and the report's sizes).

Two epochs of 8 steps. Options: ``--checkpoints`` (one at every epoch end in ``OUT_DIR/ckpt``;
with ``--full`` each is one file of the full state dict, else a sharded directory),
``--resume PATH`` (``fit(ckpt_path=PATH)``), ``--rank-seeds`` (each rank initialises the model
with its own seed, as FSDP2 does not synchronise them), ``--method NAME``, ``--no-finalize``,
``--tensorboard`` (a ``TensorBoardLogger`` in ``OUT_DIR``: metrics and histograms),
``--accumulate N`` (``accumulate_grad_batches``), ``--implementation NAME`` (the DKM step,
``unique`` by default). ``result.pt`` also holds the warnings rank 0 saw and, per training
batch, whether the centroids moved during it (``moved``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_helpers import CentroidRecorder, random_classification

from lightning_dkm import DKMCallback


class ShardedMLP(pl.LightningModule):
    """Linear(32->64) -> ReLU -> Linear(64->64) -> ReLU -> Linear(64->4); under FSDP2 every
    Linear is its own FSDP unit (``fully_shard`` in ``configure_model``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
        )
        self.example_input_array = torch.zeros(2, 32)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return  # DDP
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]  # the whole 2-D mesh would mean HSDP
        for module in self.body:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(random_classification(256), batch_size=16)


class MoveRecorder(pl.Callback):
    """Whether the centroids moved during each training batch (DKM steps per optimizer step)."""

    def __init__(self) -> None:
        self.moved: list[bool] = []
        self._before: list[torch.Tensor] = []

    def _centroids(self, pl_module) -> list[torch.Tensor]:
        from lightning_dkm import clustered_tensors

        return [t.parametrization.centroids.clone()
                for t in clustered_tensors(pl_module).values()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._centroids(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._centroids(pl_module)
        pairs = zip(after, self._before, strict=True)
        self.moved.append(any(not torch.equal(a, b) for a, b in pairs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("strategy", choices=["fsdp", "ddp"])
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--resume")
    parser.add_argument("--rank-seeds", action="store_true")
    parser.add_argument("--method", default="dkm")
    parser.add_argument("--no-finalize", action="store_true")
    parser.add_argument("--tensorboard", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--implementation", default="unique")
    # the FSDP2 / DDP comparisons cluster every tensor at bits=2 under both strategies (the
    # default budget chooses widths from a Hessian under DDP and falls back to uniform under FSDP2)
    parser.add_argument("--average-bits", choices=["none", "bits"], default="none")
    args = parser.parse_args()
    out = Path(args.out_dir)
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                              save_distributed_checkpoint=not args.full)
        if args.strategy == "fsdp" else DDPStrategy(broadcast_buffers=False)
    )
    checkpoints = [ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1)] if args.checkpoints else []
    # implementation "unique" (what "auto" picks for tensors of >= 16,384 weights): under FSDP2
    # it rebuilds the soft weights in the backward (clustering_pass), under DDP it keeps them.
    callback = DKMCallback(bits=2, seed=0, save_dir=str(out / "dkm"), verbose=False,
                           method=args.method, finalize=not args.no_finalize,
                           implementation=args.implementation,
                           average_bits=None if args.average_bits == "none" else args.average_bits)
    moves = MoveRecorder()
    trainer = pl.Trainer(
        default_root_dir=str(out), accelerator="cpu", devices=2, strategy=strategy,
        max_epochs=2, logger=TensorBoardLogger(str(out)) if args.tensorboard else False,
        enable_checkpointing=bool(checkpoints),
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[moves, callback, CentroidRecorder(str(out)), *checkpoints],  # moves first
        accumulate_grad_batches=args.accumulate,
    )
    # The launcher runs rank 0 and starts rank 1 with LOCAL_RANK set (the Trainer's ranks are
    # only known once fit sets up the processes).
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")) if args.rank_seeds else 0)
    model = ShardedMLP()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=args.resume)
    if trainer.global_rank == 0:
        torch.save({
            "artifact": str(callback.artifact_path) if callback.artifact_path else None,
            "palettes": {n: p.weight() for n, p in callback.palettes.items()},
            "finalized": None if callback.finalized_model is None
            else callback.finalized_model.state_dict(),
            "report_bytes": None if callback.report is None else callback.report.total_bytes,
            "warnings": [str(w.message) for w in seen],
            "moved": moves.moved,
            "bit_allocation": None if callback.bit_allocation is None
            else callback.bit_allocation.to_dict(),
        }, out / "result.pt")


if __name__ == "__main__":
    main()
