"""torchmetrics metrics that show how far DKM clustering has converged.

* :class:`AssignmentEntropy`: how soft the DKM assignments still are (bits per weight).
* :class:`ClusterUsage`: how evenly the hard assignments use the palette, and how many
  centroids are dead (never nearest to any weight).
* :class:`SnapDistance`: how far the weights are from the palettized weights they will be
  exported as.

Every state is a fixed-size sum (``dist_reduce_fx="sum"``), never a list, so the metrics reduce
across processes with one all-reduce and their memory does not grow with the data seen. Sums of
floating-point values are accumulated in float64. Nothing here imports Lightning.

Note: float64 states are not supported on Apple MPS devices; keep these metrics on CPU there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ..engine.layout import is_int

__all__ = ["AssignmentEntropy", "ClusterUsage", "SnapDistance"]

_LN2 = math.log(2.0)


def _check_positive_int(name: str, value: int) -> int:
    if not is_int(value, 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _kind(value: object) -> str:
    """What a value that should be a tensor is, for messages: its dtype, or its type."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__


def _check_floating(name: str, value: object) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {_kind(value)}")


class _SumMetric(Metric):
    """A metric whose states are fixed-size sums (module docstring), never differentiated."""

    full_state_update = False
    is_differentiable = False

    def _add_sums(self, dtype: torch.dtype, *names: str) -> None:
        """Scalar states, zero at the start, summed across processes."""
        for name in names:
            self.add_state(name, default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")


def _entropy_bits(counts: Tensor) -> Tensor:
    """Shannon entropy in bits of the histograms along the last dim of ``counts``.

    ``H = -sum_j p_j log2 p_j`` with ``p = counts / counts.sum()`` and ``0 log 0 = 0``;
    an all-zero histogram gives NaN (no data).
    """
    p = counts / counts.sum(dim=-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(dim=-1) / _LN2


def _sum_p_log_p(p: Tensor) -> Tensor:
    r""":math:`\sum p \log p` over all entries of ``p`` (probabilities), in float64, with
    :math:`0 \log 0 = 0`: ``p`` times the log of ``p`` raised to the dtype's smallest normal
    number, computed in place on that one temporary. What ``torch.special.xlogy(p, p)`` gives
    up to the last bits of each log (a vectorised log against xlogy's scalar one; 1e-9 of the
    sum) and on subnormal entries (less than 1e-36 each), at a third of its time on CPU for 16
    centroids and half of it for 4 (one thread, 65,536 rows)."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log_().mul_(p).sum(dtype=torch.float64)


class AssignmentEntropy(_SumMetric):
    """Mean Shannon entropy, in bits, of the rows of a soft-assignment matrix.

    For a row ``p`` of the DKM attention matrix (the probabilities that one weight belongs to
    each of the ``k`` centroids), ``H(p) = -sum_j p_j log2 p_j`` with ``0 log 0 = 0``.
    :meth:`compute` returns the mean of ``H`` over every row seen. It is ``log2(k)`` for uniform
    rows (maximally soft) and falls to ``0`` as the assignments harden into one-hot rows, i.e. as
    the soft DKM weights approach the palettized weights that will be exported.

    Rows are processed ``chunk_rows`` at a time under ``torch.no_grad()``, so an update allocates
    at most one temporary of shape ``(chunk_rows, k)`` (two for float16/bfloat16 inputs, which
    are upcast to float32 per chunk); inputs like ``1e6 x 256`` are fine. Rows are assumed to be
    valid probabilities (non-negative, summing to 1); this is not checked, to avoid a device
    synchronisation per update. Non-contiguous inputs with more than two dimensions are copied
    when flattened.

    Args:
        chunk_rows: rows per chunk (>= 1).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    # A diagnostic: low entropy means hard assignments (small train/export gap), but collapsing
    # too early stalls the clustering, so neither direction is uniformly better.
    higher_is_better = None

    entropy_sum: Tensor
    row_count: Tensor

    def __init__(self, chunk_rows: int = 2**16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_rows = _check_positive_int("chunk_rows", chunk_rows)
        self._add_sums(torch.float64, "entropy_sum")
        self._add_sums(torch.int64, "row_count")

    def update(self, probs: Tensor) -> None:
        """Add the rows of ``probs`` (shape ``(..., k)``, rows summing to 1)."""
        _check_floating("probs", probs)
        if probs.ndim == 0 or probs.shape[-1] == 0:
            raise ValueError(
                f"probs must have shape (..., k) with k >= 1, got {tuple(probs.shape)}"
            )
        probs = probs.detach()
        rows = probs if probs.ndim == 2 else probs.reshape(-1, probs.shape[-1])
        upcast = rows.dtype in (torch.float16, torch.bfloat16)
        total = torch.zeros((), dtype=torch.float64, device=rows.device)
        with torch.no_grad():
            for chunk in rows.split(self.chunk_rows):
                c = chunk.float() if upcast else chunk
                # sum_rows sum_j p log p (nats); negated and converted to bits below.
                total += _sum_p_log_p(c)
        self.entropy_sum += -total / _LN2
        self.row_count += rows.shape[0]

    def compute(self) -> Tensor:
        """Mean entropy in bits per row (float64 scalar; NaN if no rows were seen)."""
        return self.entropy_sum / self.row_count


class ClusterUsage(_SumMetric):
    """Histogram of hard cluster assignments: usage entropy, perplexity and dead clusters.

    ``update(indices)`` adds the cluster id of each weight (the argmax of its DKM assignment, or
    its nearest centroid) to a count per cluster. :meth:`compute` returns a dict of float64
    scalars:

    * ``usage_entropy``: ``H = -sum_j p_j log2 p_j`` of the normalised histogram ``p``, in bits
      (``log2(k)`` when all ``k`` clusters are used equally, ``0`` when one takes everything);
    * ``perplexity``: ``2 ** H``, the effective number of clusters in use (``1 .. k``);
    * ``dead_clusters``: number of clusters that were never assigned a weight;
    * ``dead_fraction``: ``dead_clusters / (num_palettes * num_clusters)``.

    Several palettes: a tensor clustered with ``P`` palettes of ``k`` centroids each (e.g. one
    per output-channel group) has indices in ``[0, k)`` per palette, and one histogram over them
    would mix palettes and hide dead centroids. Pass ``num_palettes=P`` and indices of shape
    ``(P, ...)`` (palette first); each palette gets its own histogram. ``usage_entropy`` and
    ``perplexity`` are then averaged over palettes (each palette counts equally), and
    ``dead_clusters`` is summed over them.

    Args:
        num_clusters: centroids per palette ``k`` (>= 1); indices must lie in ``[0, k)``.
        num_palettes: palettes ``P`` (>= 1); with ``P > 1`` indices must have shape ``(P, ...)``.
        validate_args: check that indices are in range; costs one device synchronisation per
            update, so it can be turned off in hot loops (without it an update reads nothing
            back from the device).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = None  # mixed: higher perplexity is better, more dead clusters is worse

    counts: Tensor

    def __init__(
        self,
        num_clusters: int,
        num_palettes: int = 1,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_clusters = _check_positive_int("num_clusters", num_clusters)
        self.num_palettes = _check_positive_int("num_palettes", num_palettes)
        self.validate_args = validate_args
        self.add_state(
            "counts",
            default=torch.zeros(num_palettes, num_clusters, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, indices: Tensor) -> None:
        """Count the cluster ids in ``indices`` (integer tensor; ``(P, ...)`` when ``P > 1``)."""
        if (
            not isinstance(indices, Tensor)
            or indices.is_floating_point()
            or indices.is_complex()
            or indices.dtype == torch.bool
        ):
            raise ValueError(f"indices must be an integer tensor, got {_kind(indices)}")
        p, k = self.num_palettes, self.num_clusters
        if p > 1 and (indices.ndim == 0 or indices.shape[0] != p):
            raise ValueError(
                f"indices must have shape (num_palettes={p}, ...) with num_palettes > 1, "
                f"got {tuple(indices.shape)}"
            )
        indices = indices.detach()
        if self.validate_args and indices.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(indices))
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise ValueError(f"indices must lie in [0, num_clusters={k}), got a value of {bad}")
        flat = indices.reshape(p, -1).long()
        if p > 1:
            # Offset palette i's ids into [i * k, (i + 1) * k) so one count serves all.
            flat = flat + torch.arange(p, device=flat.device).unsqueeze(1) * k
        # index_add_ into the fixed-size histogram: bincount would read the largest id back
        # from the device to size its output.
        flat = flat.reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def compute(self) -> dict[str, Tensor]:
        """Return ``usage_entropy``, ``perplexity``, ``dead_clusters`` and ``dead_fraction``.

        Entropy and perplexity are NaN before any index has been counted.
        """
        counts = self.counts.to(torch.float64)
        entropy = _entropy_bits(counts)  # (P,)
        dead = (self.counts == 0).sum().to(torch.float64)
        return {
            "usage_entropy": entropy.mean(),
            "perplexity": torch.exp2(entropy).mean(),
            "dead_clusters": dead,
            "dead_fraction": dead / counts.numel(),
        }


class SnapDistance(_SumMetric):
    """How far weights are from their snapped (nearest-centroid) values.

    ``update(weights, snapped)`` accumulates, over all elements ``i``, ``sum (w_i - s_i)^2``,
    ``sum |w_i - s_i|`` and the element count ``n``. :meth:`compute` returns a dict of float64
    scalars ``{"rmse": sqrt(sum (w - s)^2 / n), "mean_abs": sum |w - s| / n}`` (NaN before any
    update). Both fall to 0 as DKM training pulls the weights onto the palette, i.e. as the
    trained model approaches the exported palettized one.

    Elements are processed ``chunk_size`` at a time in float64, so temporaries stay small even
    for very large weight tensors.

    Args:
        chunk_size: elements per chunk (>= 1).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    sq_sum: Tensor
    abs_sum: Tensor
    count: Tensor

    def __init__(self, chunk_size: int = 2**20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        self._add_sums(torch.float64, "sq_sum", "abs_sum")
        self._add_sums(torch.int64, "count")

    def update(self, weights: Tensor, snapped: Tensor) -> None:
        """Add the element-wise distances between ``weights`` and ``snapped`` (same shape)."""
        _check_floating("weights", weights)
        _check_floating("snapped", snapped)
        if weights.shape != snapped.shape:
            raise ValueError(
                f"weights and snapped must have the same shape, got {tuple(weights.shape)} "
                f"and {tuple(snapped.shape)}"
            )
        w = weights.detach().reshape(-1)
        s = snapped.detach().reshape(-1)
        sq = torch.zeros((), dtype=torch.float64, device=w.device)
        ab = torch.zeros((), dtype=torch.float64, device=w.device)
        with torch.no_grad():
            for wc, sc in zip(w.split(self.chunk_size), s.split(self.chunk_size), strict=True):
                d = wc.to(torch.float64) - sc.to(torch.float64)
                sq += d.square().sum()
                ab += d.abs().sum()
        self.sq_sum += sq
        self.abs_sum += ab
        self.count += w.numel()

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"rmse": ..., "mean_abs": ...}`` over all elements seen."""
        return {
            "rmse": torch.sqrt(self.sq_sum / self.count),
            "mean_abs": self.abs_sum / self.count,
        }
