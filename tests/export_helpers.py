"""The model every export test converts: one layer of each kind a palette can sit on."""

from __future__ import annotations

import torch
from torch import nn


class EveryLayer(nn.Module):
    """Embedding, Conv1d, Conv2d, ConvTranspose2d and Linear, small enough to convert quickly."""

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
