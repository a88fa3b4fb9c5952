"""Post-training palettization: plain k-means on the chosen weights, no training.

This is the baseline every study compares DKM against: the same targets, the same palette
format (LUT + indices) and the same report, but the centroids come from k-means on the trained
weights alone, without letting the loss adapt the weights to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .kmeans import kmeans
from .layout import ClusterSpec
from .palette import Palette
from .parametrize import stable_seed
from .targets import DEFAULT_MIN_SIZE, select_targets

__all__ = ["palettize"]


@torch.no_grad()
def palettize(
    model: nn.Module,
    bits: int = 4,
    cluster_dim: int = 1,
    group_size: int | None = None,
    targets: Iterable[str] | str | None = None,
    *,
    exclude: Iterable[str] | str | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
) -> dict[str, Palette]:
    """Cluster the selected weights of ``model`` in place with k-means and return their palettes.

    Args:
        model: any ``nn.Module``; its targeted weights are overwritten with their snapped values.
        bits, cluster_dim, group_size: the default :class:`~lightning_dkm.layout.ClusterSpec`.
        targets, exclude, min_size, overrides: which tensors, as in
            :func:`~lightning_dkm.targets.select_targets`.
        seed: k-means++ seed; each tensor uses ``stable_seed(seed, name)``.
        n_init: k-means restarts per palette (the best inertia is kept).
        max_iter: Lloyd iterations at most.

    Returns:
        ``{parameter name: Palette}``; ``palette.weight()`` equals the new weight bit for bit.
    """
    spec = ClusterSpec(bits=bits, cluster_dim=cluster_dim, group_size=group_size)
    selected = select_targets(
        model, spec, targets=targets, exclude=exclude, min_size=min_size, overrides=overrides
    )
    modules = dict(model.named_modules())
    palettes: dict[str, Palette] = {}
    for target in selected:
        weight = getattr(modules[target.module_name], target.param_name)
        layout = target.layout
        layout.check(weight)
        generator = torch.Generator().manual_seed(stable_seed(seed, target.name))
        x = layout.to_palettes(weight.detach()).float().cpu()
        result = kmeans(
            x, layout.spec.num_centroids, generator, n_init=n_init, max_iter=max_iter,
            name=target.name,
        )
        palette = Palette(
            lut=result.centroids.to(device=weight.device, dtype=weight.dtype),
            indices=result.labels.to(weight.device),
            layout=layout,
        )
        weight.copy_(palette.weight())
        palettes[target.name] = palette
    return palettes
