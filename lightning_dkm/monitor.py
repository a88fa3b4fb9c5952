"""Measure how far clustering has come on each clustered tensor, with the torchmetrics Metrics.

For one :class:`~lightning_dkm.clustering.ClusteredTensor` this reads its trainable weight and
its parametrization's centroids and temperature (no gradient, no change of state) and returns

* ``entropy``: mean Shannon entropy (bits) of the soft-assignment rows at the current tau --
  ``log2(k)`` when every weight is spread evenly over all centroids, 0 when every weight belongs
  to exactly one: it falls toward 0 as clustering hardens;
* ``usage_entropy`` / ``perplexity``: entropy of the hard cluster-size histogram and ``2**`` it,
  the effective number of centroids in use (averaged over palettes);
* ``dead_clusters``: centroids that no weight snaps to (summed over palettes);
* ``snap_rmse``: root-mean-square distance from each weight to its nearest centroid -- how much
  finalize will move the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .clustering import ClusteredTensor
from .dkm import hard_assign
from .metrics import AssignmentEntropy, ClusterUsage, SnapDistance

__all__ = ["measure", "measure_all"]


def _metrics_for(tensor: ClusteredTensor) -> tuple[AssignmentEntropy, ClusterUsage, SnapDistance]:
    layout = tensor.parametrization.layout
    # Every process holds the same weights and centroids: no cross-process reduction needed.
    return (
        AssignmentEntropy(sync_on_compute=False),
        ClusterUsage(
            layout.spec.num_centroids, num_palettes=layout.num_palettes, sync_on_compute=False
        ),
        SnapDistance(sync_on_compute=False),
    )


@torch.no_grad()
def measure_all(
    tensors: Mapping[str, ClusteredTensor],
) -> tuple[dict[str, dict[str, float]], float]:
    """Per-tensor statistics (see module docstring) and the model-level mean assignment entropy
    (every soft-assignment row of every tensor weighted equally)."""
    per_tensor: dict[str, dict[str, float]] = {}
    model_entropy = AssignmentEntropy(sync_on_compute=False)
    for name, tensor in tensors.items():
        entropy, usage, snap = _metrics_for(tensor)
        weight = tensor.original.detach()
        parametrization = tensor.parametrization
        for chunk in parametrization.soft_assignment_chunks(weight):
            entropy.update(chunk)
            model_entropy.update(chunk)
        x = parametrization.layout.to_palettes(weight)
        idx, snapped = hard_assign(x, parametrization.centroids)
        usage.update(idx)
        snap.update(x, snapped)
        usage_stats = usage.compute()
        snap_stats = snap.compute()
        per_tensor[name] = {
            "entropy": float(entropy.compute()),
            "usage_entropy": float(usage_stats["usage_entropy"]),
            "perplexity": float(usage_stats["perplexity"]),
            "dead_clusters": float(usage_stats["dead_clusters"]),
            "snap_rmse": float(snap_stats["rmse"]),
        }
    total = float(model_entropy.compute()) if per_tensor else float("nan")
    return per_tensor, total


def measure(tensor: ClusteredTensor) -> dict[str, float]:
    """Statistics of one clustered tensor (see module docstring)."""
    return measure_all({tensor.name: tensor})[0][tensor.name]
