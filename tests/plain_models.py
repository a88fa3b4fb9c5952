"""The plain ``nn.Module`` models the specification tests cluster, in one place.

Lightning modules (``TinyNet`` and its variants, picklable for ``ddp_spawn``) are in
``lightning_helpers.py``; these are the models of the tests that need no Trainer: palettize,
the artifact, carried palettes, packed inference, per-channel scales, the exports.
"""

from __future__ import annotations

import torch
from torch import nn


class EveryLayer(nn.Module):
    """Embedding, Conv1d, Conv2d, ConvTranspose2d and Linear: one layer of each kind a palette
    can sit on, every weight of at least 256 elements, small enough to export quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.conv1 = nn.Conv1d(32, 16, 3)
        self.conv = nn.Conv2d(4, 16, 3)
        self.deconv = nn.ConvTranspose2d(16, 8, 3)
        self.fc = nn.Linear(64, 32)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        seq = self.conv1(self.embed(tokens).transpose(1, 2)).mean(-1)  # (B, 16)
        img = self.deconv(self.conv(image)).mean((2, 3))  # (B, 8)
        return self.fc(torch.cat([seq, seq, img, img, img, img], 1))


def every_layer_inputs(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an image for :class:`EveryLayer`."""
    return torch.randint(0, 64, (batch, 10)), torch.randn(batch, 4, 8, 8)


def with_channel_magnitudes(model: EveryLayer) -> EveryLayer:
    """``model`` with the output channels of every layer spread over three decades of magnitude
    (1e-2 to 10), what ``per_channel_scale`` is for. In place; returns ``model``."""
    with torch.no_grad():
        for module in (model.embed, model.conv1, model.conv, model.fc):
            rows = module.weight.shape[0]
            shape = (-1, *[1] * (module.weight.dim() - 1))
            module.weight.mul_(torch.logspace(-2, 1, rows).view(shape))
        model.deconv.weight.mul_(torch.logspace(-2, 1, 8).view(1, -1, 1, 1))  # channels on dim 1
    return model


class EveryLayer1d(nn.Module):
    """The sequence counterpart of :class:`EveryLayer`: Embedding, Conv1d, ConvTranspose1d and
    Linear in one chain, called on token ids alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.conv = nn.Conv1d(16, 32, 3)
        self.deconv = nn.ConvTranspose1d(32, 16, 3)
        self.fc = nn.Linear(16, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.deconv(torch.relu(self.conv(self.embed(tokens).transpose(1, 2))))
        return self.fc(h.mean(-1))


class WithBatchNorm(nn.Module):
    """Embedding, Conv2d with BatchNorm2d (buffers beside the weights) and a Linear of
    ``width`` inputs (another width: a model whose shapes disagree with a file)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.conv = nn.Conv2d(4, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(width, 32)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean((2, 3)).repeat(1, 4)
        return self.fc(h) + self.embed(tokens).mean(1)


class TiedLinears(nn.Module):
    """Two clustered Linears; ``tied`` shares ``second``'s weight."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.second = nn.Linear(64, 64)
        self.tied = nn.Linear(64, 64, bias=False)
        self.tied.weight = self.second.weight
