"""What the Python snippets of README.md and docs/*.md leave to the reader, as tiny fixtures.

``tests/test_docs.py`` runs every ```` ```python ```` block of those pages, each in a fresh
namespace from :func:`snippet_namespace` with a fresh temporary folder as the working
directory. A snippet imports what it uses from the package, torch and Lightning itself; the
namespace holds only the names a page leaves to the reader:

``MyModel``
    the reader's LightningModule: ``features`` (Linear 32->64, ReLU, Linear 64->64, ReLU) and
    ``classifier`` (Linear 64->32), so three weights of >= 2048 elements get clustered;
    ``example_input_array`` set (Core ML export traces it).
``model``
    a ``MyModel`` after fit: finalized (``palettize(bits=2)``), carrying its palettes.
``datamodule``, ``data``
    a LightningDataModule of 64 random samples (two batches of 32).
``example_inputs``
    an input batch, ``(2, 32)``.
``optimizer``, ``train_one_epoch(model, optimizer)``
    SGD over ``model``'s parameters, and one pass over the data with it (a loop of your own).
``callback``
    the ``DKMCallback(bits=2, finalize=False)`` whose state the checkpoints below hold.
``save_dir``, ``artifact_path``
    ``"outputs/digits/dkm"`` (a ``DKMCallback(save_dir=...)``: the folder exists) and the
    artifact in it.

and the working directory holds the files the pages name:

``model.dkm.safetensors``, ``outputs/digits/dkm/model.dkm.safetensors``
    the artifact of a finalized ``MyModel`` (``save_compressed``).
``last.ckpt``
    a checkpoint that ``callback`` wrote during a DKM fit of ``MyModel`` (plain weights plus
    the callback's state).
``epoch=3.ckpt``
    a weights-only checkpoint of that fit (as ``ModelCheckpoint(save_weights_only=True)``
    writes: no callback hook runs, the DKM keys are kept).

A snippet that cannot run here says so right before its fence, with the reason:
``<!-- snippet: skip (needs macOS) -->``; keep those rare. The fit behind the checkpoints runs
once per test session.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MyModel", "SnippetData", "snippet_namespace"]


class MyModel(pl.LightningModule):
    """The reader's model: ``features`` and a ``classifier``, 32 inputs, 32 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 32)
        self.example_input_array = torch.zeros(2, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _samples() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 32, generator=g), torch.randint(0, 32, (64,), generator=g))


class SnippetData(pl.LightningDataModule):
    """64 random samples, batches of 32, for training and validation."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_samples(), batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_samples(), batch_size=32)


def _finalized() -> MyModel:
    from lightning_dkm import palettize

    torch.manual_seed(0)
    model = MyModel()
    palettize(model, bits=2)
    return model


def _train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for x, y in SnippetData().train_dataloader():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _callback():
    from lightning_dkm import DKMCallback

    return DKMCallback(bits=2, finalize=False, verbose=False)


@functools.cache
def _files(folder: Path) -> dict[str, Path]:
    """The artifact and the two checkpoints, written once into ``folder``."""
    from lightning_dkm import save_compressed

    folder.mkdir(parents=True, exist_ok=True)
    artifact = save_compressed(_finalized(), folder / "model.dkm.safetensors")
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(folder), accelerator="cpu", devices=1,
        limit_val_batches=0, callbacks=[_callback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MyModel(), SnippetData())
    trainer.save_checkpoint(folder / "full.ckpt")
    trainer.save_checkpoint(folder / "weights.ckpt", weights_only=True)
    return {
        "model.dkm.safetensors": artifact,
        "outputs/digits/dkm/model.dkm.safetensors": artifact,
        "last.ckpt": folder / "full.ckpt",
        "epoch=3.ckpt": folder / "weights.ckpt",
    }


def snippet_namespace(workdir: Path, cache: Path) -> dict[str, Any]:
    """A fresh namespace for one snippet; ``workdir`` (its working directory) gets the files
    above, copied from ``cache`` (where they are written once)."""
    for name, source in _files(cache).items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    model = _finalized()
    data = SnippetData()
    return {
        "__name__": "__snippet__",
        "MyModel": MyModel,
        "model": model,
        "datamodule": data,
        "data": data,
        "example_inputs": torch.randn(2, 32),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "train_one_epoch": _train_one_epoch,
        "callback": _callback(),
        "save_dir": "outputs/digits/dkm",
        "artifact_path": "outputs/digits/dkm/model.dkm.safetensors",
    }
