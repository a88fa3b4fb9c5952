"""Measure how far clustering has come on each clustered tensor.

For one :class:`~lightning_dkm.model.attach.ClusteredTensor` this reads its trainable weight and
its parametrization's centroids and temperature (no gradient, no change of state) and returns
``entropy``, ``usage_entropy``, ``perplexity``, ``dead_clusters`` and ``snap_rmse``, the
statistics the callback logs as ``dkm/<statistic>/<tensor>`` (defined in ``docs/metrics.md``).
The usage and snap statistics come from the torchmetrics Metrics of :mod:`.metrics`; the entropy
is :class:`~.metrics.AssignmentEntropy`'s mean, computed from the attention's logits
(:meth:`~lightning_dkm.engine.parametrization.DKMParametrization.soft_assignment_entropy`)
rather than from the soft assignments it would be fed: the same value to float rounding, without
a ``(rows, k)`` logarithm.

The metrics live on the weights' device (CPU on Apple MPS, where their float64 states are not
supported), so measuring a CUDA model moves no weight to the host; each tensor's five values
come back to the host in one read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..engine.numerics import hard_assign
from ..model.attach import ClusteredTensor
from .metrics import ClusterUsage, SnapDistance

__all__ = ["measure_all"]

_STATISTICS = ("entropy", "usage_entropy", "perplexity", "dead_clusters", "snap_rmse")


@torch.no_grad()
def measure_all(
    tensors: Mapping[str, ClusteredTensor],
) -> tuple[dict[str, dict[str, float]], float]:
    """Per-tensor statistics (module docstring) and the model-level mean assignment entropy
    (every soft-assignment row of every tensor weighted equally)."""
    per_tensor: dict[str, dict[str, float]] = {}
    # The model's entropy from the tensors' own entropy sums and row counts (on the first
    # tensor's device), so that every soft-assignment row goes through the entropy once.
    model_sums: list[Tensor] = []
    for name, tensor in tensors.items():
        weight = tensor.full_original()  # gathered when FSDP2 shards it
        # the metrics live with the weight, except on MPS (no float64 there: module docstring)
        device = torch.device("cpu") if weight.device.type == "mps" else weight.device
        parametrization = tensor.parametrization
        layout = parametrization.layout
        # Every process holds the same weights and centroids: no cross-process reduction needed.
        # The indices come from hard_assign, always in range: no validation (a host read).
        usage = ClusterUsage(layout.spec.num_centroids, num_palettes=layout.num_palettes,
                             validate_args=False, sync_on_compute=False).to(device)
        snap = SnapDistance(sync_on_compute=False).to(device)
        # the sum of every row's entropy in bits and the rows (AssignmentEntropy's states),
        # from the logits: no (rows, k) probabilities formed
        nats, count = parametrization.soft_assignment_entropy(weight)
        entropy_sum = nats.to(device) / math.log(2)
        rows = torch.full((), count, dtype=torch.float64, device=device)  # no copy to a GPU
        first = model_sums[0].device if model_sums else device
        model_sums.append(torch.stack([entropy_sum, rows]).to(first))
        x = parametrization.to_palettes(weight)
        idx, snapped = hard_assign(x, parametrization.centroids)
        usage.update(idx.to(device))
        if parametrization.scale is not None:  # the snap error in the weight's own units
            x, snapped = weight, parametrization.from_palettes(snapped)
        snap.update(x.to(device), snapped.to(device))
        usage_stats = usage.compute()
        values = torch.stack([
            entropy_sum / rows, usage_stats["usage_entropy"], usage_stats["perplexity"],
            usage_stats["dead_clusters"], snap.compute()["rmse"],
        ]).tolist()  # one read per tensor
        per_tensor[name] = dict(zip(_STATISTICS, values, strict=True))
    if not model_sums:
        return per_tensor, float("nan")
    entropy_sum, rows = torch.stack(model_sums).sum(0).tolist()
    return per_tensor, entropy_sum / rows
