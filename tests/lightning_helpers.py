"""Tiny Lightning models and data for the callback's specification tests (BoringModel style).

Kept in an importable module (not in a test file) so ``ddp_spawn`` workers can unpickle them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def random_classification(n: int = 128, features: int = 32, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(1)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """Linear(32->64) -> ReLU -> Linear(64->64) -> ReLU -> Linear(64->4): two tensors of
    2048 and 4096 weights get clustered at the default min_size; the 256-weight head is skipped.
    """

    def __init__(self, lr: float = 0.05, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(random_classification(), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(random_classification(64, seed=1), batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(random_classification(64, seed=2), batch_size=self.hparams.batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer writing under ``tmp_path``."""
    options = dict(
        default_root_dir=str(tmp_path),
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def distinct_per_palette(weight: torch.Tensor) -> int:
    return int(torch.unique(weight).numel())


class CentroidRecorder(pl.Callback):
    """Saves every rank's centroids at the end of training (before finalize) to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning_dkm import clustered_tensors

        state = {n: t.parametrization.centroids.clone() for n, t in
                 clustered_tensors(pl_module).items()}
        torch.save(state, f"{self.out_dir}/centroids_rank{trainer.global_rank}.pt")


class TiedNet(TinyNet):
    """TinyNet with a fourth Linear that shares body.2's weight (64 x 64, clustered once)."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = nn.Linear(64, 64)
        self.tied.weight = self.body[2].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.body[2](F.relu(self.body[0](x))))
        return self.body[4](F.relu(self.tied(h)))


def assert_identical_centroids(out_dir) -> None:
    """The centroids that :class:`CentroidRecorder` saved for ranks 0 and 1 are bit for bit
    the same (TinyNet's and ShardedMLP's two clustered tensors)."""
    rank0 = torch.load(f"{out_dir}/centroids_rank0.pt", weights_only=True)
    rank1 = torch.load(f"{out_dir}/centroids_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == {"body.0.weight", "body.2.weight"}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def tau_of_unit(unit: int) -> float:
    """A temperature as a plain function ``unit -> tau`` that a YAML names by import path."""
    return 1e-2 / (1 + unit)


class RankDataNet(TinyNet):
    """TinyNet whose training data differs per rank (its seed is the rank), so that anything
    computed from the training batches on each rank would differ between ranks."""

    def train_dataloader(self):
        return DataLoader(random_classification(seed=10 + self.trainer.global_rank),
                          batch_size=self.hparams.batch_size)


class AllocationRecorder(pl.Callback):
    """Saves every rank's ``DKMCallback.bit_allocation`` (as its dict) at the start of training
    to ``out_dir/allocation_rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module) -> None:
        import json

        from lightning_dkm import DKMCallback

        dkm = next(c for c in trainer.callbacks if isinstance(c, DKMCallback))
        with open(f"{self.out_dir}/allocation_rank{trainer.global_rank}.json", "w") as f:
            json.dump(dkm.bit_allocation.to_dict(), f)


class WideNet(TinyNet):
    """TinyNet with a 128 x 128 middle layer: its 16,384 weights take the ``"unique"`` step
    (batched in the clustering pass on CPU at 2 bits); the first layer takes ``"reference"``."""

    def __init__(self, lr: float = 0.05, batch_size: int = 32) -> None:
        super().__init__(lr, batch_size)
        self.body = nn.Sequential(
            nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
        )


class GradientRecorder(pl.Callback):
    """At the first optimizer step (after every callback before it in the list), the
    gradients of the clustered originals and of every other parameter, and the centroids;
    saved to ``out_dir/gradients_rank{r}.pt`` when ``out_dir`` is given (for ddp_spawn)."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.record: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.record is not None:
            return
        self.record = {
            name: (p.grad.clone() if p.grad is not None else torch.zeros(0))
            for name, p in pl_module.named_parameters()
        }
        self.record.update({
            name: b.clone() for name, b in pl_module.named_buffers() if name.endswith("centroids")
        })
        if self.out_dir is not None:
            torch.save(self.record, f"{self.out_dir}/gradients_rank{trainer.global_rank}.pt")


class DealtWideNet(WideNet):
    """WideNet whose training samples are dealt out in turn to the ranks, unshuffled
    (``DistributedSampler(shuffle=False)``; run with ``use_distributed_sampler=False``): the
    ranks' first ``b`` samples together are the first ``world_size * b`` of one process."""

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        data = random_classification()
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)


class SquareOnce(torch.autograd.Function):
    """``x**2`` whose backward has no derivative of its own (as some fused kernels): a loss
    through it has no double backward, so ``average_bits`` takes its Hessian by finite
    differences."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.square()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad
