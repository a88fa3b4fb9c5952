"""The models the performance benchmarks time, with a batch of synthetic inputs for each.

* ``cnn``: the 0.9M-parameter digits CNN (conv 64-128-256, fc 1024-512-10), 8x8 inputs,
  batch 64 -- the network coremltools' DKMPalettizer was measured on (12.6x a plain step).
* ``resnet18``: a CIFAR-style ResNet-18 (11.2M parameters), 32x32 inputs, batch 32.
* ``minilm``: a 6-layer transformer encoder of all-MiniLM-L6-v2's size (hidden 384, 12 heads,
  FFN 1536, vocabulary 30,522: 22.7M parameters), batch 8 x 64 tokens, randomly initialised
  (timing does not depend on the values; the real pretrained model is used by the accuracy
  study).

Inputs are synthetic (random), as timing and memory do not depend on the data.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import digits_cnn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class MiniLMSized(nn.Module):
    """Token + position embeddings and a 6-layer post-norm encoder, mean-pooled."""

    def __init__(self, vocab: int = 30522, hidden: int = 384, layers: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(512, hidden)
        layer = nn.TransformerEncoderLayer(hidden, 12, 4 * hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.encoder(self.tokens(ids) + self.positions(pos)).mean(1)


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _classification(shape, classes):
    def batch(g: torch.Generator):
        return torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)

    return batch


def _tokens(g: torch.Generator):
    return torch.randint(0, 30522, (8, 64), generator=g), torch.randn(8, 384, generator=g)


WORKLOADS = {
    "cnn": Workload("cnn", digits_cnn, _classification((64, 1, 8, 8), 10), F.cross_entropy),
    "resnet18": Workload("resnet18", resnet18, _classification((32, 3, 32, 32), 10),
                         F.cross_entropy),
    "minilm": Workload("minilm", MiniLMSized, _tokens, F.mse_loss),
}
