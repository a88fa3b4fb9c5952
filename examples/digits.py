"""A small CNN on scikit-learn's bundled digits data (1,797 8x8 images, no download).

``DigitsCNN`` is the 0.9M-parameter network of the benchmarks (conv 64-128-256, fc 1024-512-10);
``DigitsDataModule`` splits the data 60/20/20 into train/val/test with a fixed seed.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, scaled to [0, 1], as (N, 1, 8, 8) float tensors.

    Args:
        batch_size: mini-batch size for every split.
        seed: seed of the train/val/test split.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
        parts = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        self.splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def digits_cnn(widths: tuple[int, int, int] = (64, 128, 256), hidden: int = 512) -> nn.Sequential:
    """conv(1->w0) conv(w0->w1) pool conv(w1->w2) pool fc(4*w2->hidden) fc(hidden->10)."""
    w0, w1, w2 = widths
    return nn.Sequential(
        nn.Conv2d(1, w0, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w0, w1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * w2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class DigitsCNN(pl.LightningModule):
    """Classifier for the 8x8 digits.

    Args:
        lr: Adam learning rate (used when no ``optimizer:`` block is given to LightningCLI).
        widths: channels of the three conv layers.
        hidden: width of the hidden fully connected layer.
    """

    def __init__(
        self, lr: float = 1e-3, widths: tuple[int, int, int] = (64, 128, 256), hidden: int = 512
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = digits_cnn(tuple(widths), hidden)
        # Lets the compression report count MACs and estimate energy per inference.
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
