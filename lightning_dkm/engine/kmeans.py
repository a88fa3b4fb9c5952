"""Plain (hard) k-means on tensors: distances, nearest centroid, k-means++ seeding, Lloyd.

Every function works on a *batch of independent problems*, one per palette: data ``x`` has shape
``(P, n, d)`` (P palettes, n points of dimension d each) and centroids have shape ``(P, k, d)``.
A single tensor is simply ``P = 1``. Nothing here knows about modules, Lightning or DKM; the
differentiable step in :mod:`lightning_dkm.engine.numerics` builds on these functions.

Seeding is driven by a :class:`torch.Generator`, so the same seed gives the same centroids on
every process (this is how all DDP ranks agree without communication).

**Scale.** :func:`kmeans` and :func:`lloyd` divide each palette by the power of two just above its
largest ``|x|`` (:func:`palette_unit`) and multiply the centroids back: squared distances, the
k-means++ probabilities and Lloyd's stopping threshold then stay far from float32's overflow
(weights of 1e20 square to 1e40) and underflow (1e-20 squares to 1e-40, below its normal
range), so weights of any magnitude cluster as unit ones do. Dividing by a power of two rounds
nothing, so ordinary weights get bit for bit the centroids they got unscaled.
:func:`nearest_centroid` compares distances, not their squares, for scalars, and rescales
vectors the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import native
from .optimal1d import optimal_kmeans_1d_many, optimal_kmeans_1d_widths

__all__ = [
    "WAVE_WEIGHTS",
    "KMeansResult",
    "kmeans",
    "kmeans_centroids",
    "kmeans_centroids_many",
    "kmeans_plusplus",
    "kmeans_scalars",
    "kmeans_widths",
    "lloyd",
    "member_means",
    "nearest_centroid",
    "palette_unit",
    "power_of_two",
    "sq_distances",
    "waves",
]

# Rows of `x` processed at once by nearest_centroid for d > 1, to bound the (rows x k) buffer.
_ROW_CHUNK = 1 << 18
# k-means++ seeds on at most this many points per palette (a random subset); Lloyd then runs on
# all points. Seeding cost is O(n k L); Lloyd's is O(n k) per iteration.
_MAX_SEED_POINTS = 1 << 16
# Scalar labels are counted (a comparison pass per midpoint) up to this many centroids, found
# by a sorted search above.
_COUNTED_LABELS = 16
# Points counted at once (their comparisons then stay in cache).
_LABEL_PIECE = 1 << 16


def power_of_two(magnitude: Tensor) -> Tensor:
    """For each entry of ``magnitude`` (>= 0) the power of two just above it (``m / 2**e`` in
    ``[0.5, 1)``), kept inside the normal range of its dtype so that it and its inverse are
    exact; 1 where the entry is 0 or not finite (nothing to rescale). Multiplying or dividing
    by it rounds nothing. Four small ops, no host read."""
    bound = int(-math.log2(torch.finfo(magnitude.dtype).tiny))  # 126 for float32
    exponent = torch.frexp(magnitude).exponent.clamp_(-bound, bound)
    return torch.exp2(exponent.to(magnitude.dtype))


def palette_unit(x: Tensor) -> Tensor:
    """``(P, 1, 1)``: the power of two just above each palette's largest ``|x|`` of ``x``
    ``(P, n, d)`` (:func:`power_of_two`). ``x / palette_unit(x)`` lies within ``(-1, 1)``,
    exactly scaled."""
    flat = x.reshape(x.shape[0], -1)
    low, high = flat.amin(1), flat.amax(1)  # 5x faster than aminmax along a dim (torch 2.13)
    return power_of_two(torch.maximum(high, -low)).view(-1, 1, 1)


def sq_distances(xt: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
    r"""Squared Euclidean distances ``D[p, j, i] = ||xt[p, :, i] - c[p, j]||^2`` laid out
    ``(P, k, n)`` from points ``xt`` ``(P, d, n)`` and centroids ``c`` ``(P, k, d)``: the one
    home of this distance (k-means, the DKM steps, the temperature search).

    The points run innermost, so every elementwise pass over the ``k x n`` matrix is a
    contiguous loop (about 3x faster on CPU than ``(P, n, k)`` for small k). The distance is
    symmetric: ``sq_distances(c.mT, x)`` lays it out ``(P, n, k)`` for ``x`` of ``(P, n, d)``.
    For ``d == 1`` the difference is formed directly (exact). For ``d > 1`` the expansion
    :math:`\|x\|^2 - 2 x \cdot c + \|c\|^2` keeps memory at ``k x n`` instead of ``k x n x d``;
    it is clamped at 0 against rounding. Callers that need accuracy for data far from the origin
    centre it first (distances are translation invariant). ``out``: a tensor of the result's
    shape to write it into.
    """
    if xt.shape[1] == 1:
        return torch.sub(xt, c, out=out).square_()
    x2 = xt.square().sum(1, keepdim=True)
    c2 = c.square().sum(-1, keepdim=True)
    return torch.baddbmm(x2 + c2, c, xt, alpha=-2.0, out=out).clamp_min_(0.0)


def _nearest_1d(x: Tensor, c: Tensor) -> Tensor:
    """Exact argmin for d == 1 in O(n log k): binary search on sorted centroids, then the two
    neighbours are compared by their distance ``|x - c|`` (ties go to the lower index). Not
    squared: a square overflows for weights of 1e20 and underflows for 1e-20, and the
    comparison does not need it. One loop of :mod:`.native` where it takes the weights (the
    same indices, in a tenth of the time), else PyTorch ops (:func:`nearest_1d_by_ops`)."""
    sorted_c, order = torch.sort(c.squeeze(-1), dim=-1, stable=True)
    points = x.squeeze(-1)
    loops = native.loops_for(points, sorted_c)
    found = None if loops is None else loops.nearest_sorted(points, sorted_c, order)
    return found if found is not None else nearest_1d_by_ops(points, sorted_c, order)


def nearest_1d_by_ops(points: Tensor, sorted_c: Tensor, order: Tensor) -> Tensor:
    """:func:`_nearest_1d` of ``points`` (P, n) by PyTorch ops, from each palette's centroids
    sorted ascending (P, k) and their indices ``order``."""
    k = sorted_c.shape[1]
    sorted_c = sorted_c.contiguous()
    pos = torch.searchsorted(sorted_c, points.contiguous())
    lo = (pos - 1).clamp(0, k - 1)
    # a centroid value given twice: the first of its run (the lowest index, as argmin ties)
    lo = torch.minimum(torch.searchsorted(sorted_c, sorted_c.gather(1, lo)), lo)
    hi = pos.clamp(0, k - 1)
    d_lo = (points - sorted_c.gather(1, lo)).abs_()
    d_hi = (points - sorted_c.gather(1, hi)).abs_()
    orig_lo = order.gather(1, lo)
    orig_hi = order.gather(1, hi)
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (orig_hi < orig_lo))
    return torch.where(take_hi, orig_hi, orig_lo)


@torch.no_grad()
def nearest_centroid(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid for every point: shape ``(P, n)``, dtype int64.

    Ties go to the lowest centroid index, as ``argmin`` does. Memory stays bounded for any n:
    1-D data uses a sorted search (no ``n x k`` matrix), vectors are processed in row chunks,
    each divided (with the centroids) by the power of two just above the largest ``|c|`` and
    ``|x|`` there, so that the squared distances neither overflow nor underflow whatever the
    weights' magnitude (module docstring).
    """
    _check_batch(x, c)
    if x.shape[-1] == 1:
        return _nearest_1d(x, c)
    out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    c_unit = palette_unit(c)
    for start in range(0, x.shape[1], _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, x.shape[1])
        rows = x[:, start:stop]
        unit = torch.maximum(c_unit, palette_unit(rows))
        out[:, start:stop] = sq_distances((c / unit).mT, rows / unit).argmin(-1)
    return out


def _check_batch(x: Tensor, c: Tensor) -> None:
    if x.dim() != 3 or c.dim() != 3:
        raise ValueError(
            f"x and centroids must be 3-D (P, n, d) and (P, k, d); got {tuple(x.shape)} and "
            f"{tuple(c.shape)}"
        )
    if x.shape[0] != c.shape[0] or x.shape[2] != c.shape[2]:
        raise ValueError(
            f"x {tuple(x.shape)} and centroids {tuple(c.shape)} disagree on P or d"
        )


def _placeholder_centroids(x: Tensor, count: int) -> Tensor:
    """``count`` distinct points per palette that lie outside the data (beyond its maximum).

    Used when a palette has fewer distinct values than k: the surplus centroids must be neither
    duplicates (ambiguous assignment) nor NaN; placed past the data they simply stay unused.
    """
    hi = x.amax(dim=1, keepdim=True)  # (P, 1, d)
    lo = x.amin(dim=1, keepdim=True)
    span = (hi - lo).amax(-1, keepdim=True)
    magnitude = hi.abs().amax(-1, keepdim=True).clamp_min(1.0)
    step = torch.maximum(span, 1e-3 * magnitude)
    steps = torch.arange(1, count + 1, device=x.device, dtype=x.dtype).view(1, count, 1)
    return hi + steps * step


@torch.no_grad()
def kmeans_plusplus(
    x: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    sample_weight: Tensor | None = None,
    n_local_trials: int | None = None,
) -> Tensor:
    r"""Greedy k-means++ seeding (D^2 sampling), batched over palettes.

    The first centroid is drawn with probability proportional to ``sample_weight``; each next one
    from ``L = n_local_trials`` candidates drawn with probability :math:`\propto w_i D_i^2`
    (:math:`D_i` the distance to the nearest chosen centroid), keeping the candidate that lowers
    the potential :math:`\sum_i w_i D_i^2` most (Arthur & Vassilvitskii 2007; L = 2 + ln k as in
    scikit-learn). Palettes whose potential reaches zero have fewer distinct points than k; their
    remaining centroids are distinct placeholders outside the data (see :func:`kmeans`).

    Returns centroids of shape ``(P, k, d)`` in the dtype of ``x``.
    """
    _check_k(x, k)
    P, n, d = x.shape
    w = torch.ones(P, n, dtype=x.dtype, device=x.device) if sample_weight is None else sample_weight
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    rows = torch.arange(P, device=x.device)

    centers = torch.empty(P, k, d, dtype=x.dtype, device=x.device)
    first = torch.multinomial(w, 1, generator=generator).squeeze(1)
    centers[:, 0] = x[rows, first]
    closest = sq_distances(centers[:, :1].mT, x).squeeze(-1)  # (P, n)
    exhausted = torch.zeros(P, dtype=torch.bool, device=x.device)
    for i in range(1, k):
        potential = w * closest
        exhausted |= potential.sum(-1) <= 0
        probs = torch.where(exhausted[:, None], w, potential)
        cand = torch.multinomial(probs, trials, replacement=True, generator=generator)  # (P, L)
        cand_x = x[rows[:, None], cand]  # (P, L, d)
        trial_closest = torch.minimum(closest.unsqueeze(-1), sq_distances(cand_x.mT, x))
        best = (w.unsqueeze(-1) * trial_closest).sum(1).argmin(-1)  # (P,)
        centers[:, i] = cand_x[rows, best]
        closest = trial_closest[rows, :, best]
    if bool(exhausted.any()):
        centers = _dedupe_centroids(x, centers)
    return centers


def _dedupe_centroids(x: Tensor, centers: Tensor) -> Tensor:
    """Replace repeated centroids of a palette by distinct placeholders outside its data."""
    P, k, _ = centers.shape
    out = centers.clone()
    placeholders = _placeholder_centroids(x, k)
    positions = torch.arange(k, device=centers.device)
    for p in range(P):
        distinct, inverse = torch.unique(centers[p], dim=0, return_inverse=True)
        # the first occurrence of each distinct centroid keeps its place
        first = torch.full((distinct.shape[0],), k, dtype=torch.long, device=centers.device)
        first.scatter_reduce_(0, inverse, positions, "amin")
        duplicate = torch.ones(k, dtype=torch.bool, device=centers.device)
        duplicate[first] = False
        n_dup = int(duplicate.sum())
        if n_dup:
            out[p, duplicate] = placeholders[p, :n_dup]
    return out


def _check_k(x: Tensor, k: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must have shape (P, n, d); got {tuple(x.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    if x.shape[1] < k:
        raise ValueError(
            f"k-means needs at least k={k} points per palette; got n={x.shape[1]}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor; got dtype {x.dtype}")


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans` / :func:`lloyd`."""

    centroids: Tensor  # (P, k, d)
    labels: Tensor  # (P, n) int64
    inertia: Tensor  # (P,) sum of squared distances to the assigned centroid


def _inertia(x: Tensor, c: Tensor, labels: Tensor, w: Tensor | None) -> Tensor:
    snapped = c.gather(1, labels.unsqueeze(-1).expand(-1, -1, c.shape[-1]))
    err = (x - snapped).square().sum(-1)
    if w is not None:
        err = err * w
    return err.sum(-1)


@torch.no_grad()
def lloyd(
    x: Tensor,
    centroids: Tensor,
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_weight: Tensor | None = None,
) -> KMeansResult:
    r"""Lloyd's algorithm from the given centroids, batched over palettes.

    Each iteration assigns every point to its nearest centroid and moves each centroid to the
    (weighted) mean of its members; a centroid with no members stays where it is (it never
    becomes NaN). Stops after ``max_iter`` iterations or when every centroid moved less than
    ``tol`` times the data's mean per-dimension variance squared distance (scikit-learn's rule).
    Inertia never increases from one iteration to the next. Runs on each palette divided by
    :func:`palette_unit` (module docstring): the same result for weights of any magnitude.
    """
    _check_batch(x, centroids)
    unit = palette_unit(x)
    result = _lloyd(x / unit, centroids / unit, max_iter, tol, sample_weight)
    return _scaled_back(result, unit)


def _scaled_back(result: KMeansResult, unit: Tensor) -> KMeansResult:
    """A result computed on ``x / unit``, in the units of ``x``."""
    return KMeansResult(result.centroids * unit, result.labels,
                        result.inertia * unit.view(-1).square())


def member_means(
    x: Tensor, labels: Tensor, k: int, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""The (weighted) mean of each cluster's members, ``(P, k, d)``, of ``x`` ``(P, n, d)``
    under ``labels`` ``(P, n)``, and each cluster's total weight ``(P, k)`` (its member count
    without ``weights``), in ``x``'s dtype: :math:`\bar x_j = \sum_{a(i)=j} w_i x_i /
    \sum_{a(i)=j} w_i`. An empty cluster's mean is 0; its count says that it is empty."""
    P, _, d = x.shape
    wx = x if weights is None else x * weights.unsqueeze(-1)
    ones = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if weights is None else weights
    sums = torch.zeros(P, k, d, dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, d), wx)
    counts = torch.zeros(P, k, dtype=x.dtype, device=x.device).scatter_add_(1, labels, ones)
    return sums / counts.clamp_min(1e-30).unsqueeze(-1), counts


def _lloyd(x: Tensor, centroids: Tensor, max_iter: int, tol: float,
           sample_weight: Tensor | None) -> KMeansResult:
    """:func:`lloyd` on data already scaled to about unit magnitude."""
    k = centroids.shape[1]
    c = centroids.clone()
    w = sample_weight
    threshold = tol * x.var(dim=1, unbiased=False).mean() if x.shape[1] > 1 else x.new_zeros(())
    for _ in range(max_iter):
        labels = nearest_centroid(x, c)
        means, counts = member_means(x, labels, k, w)
        new_c = torch.where(counts.unsqueeze(-1) > 0, means, c)
        shift = (new_c - c).square().sum(-1).amax()
        c = new_c
        if shift <= threshold:
            break
    labels = nearest_centroid(x, c)
    return KMeansResult(c, labels, _inertia(x, c, labels, w))


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_weight: Tensor | None = None,
    name: str | None = None,
) -> KMeansResult:
    """k-means of every palette: for scalars (``d == 1``) the optimal partition
    (:func:`~lightning_dkm.engine.optimal1d.optimal_kmeans_1d`, a dynamic program over the
    sorted values: no seeding, no restarts, the same result for any seed); for vectors
    k-means++ seeding followed by Lloyd's algorithm, the best of ``n_init`` runs per palette.

    Args:
        x: data ``(P, n, d)``; any floating dtype (computed in at least float32).
        k: number of centroids per palette.
        generator: drives the seeding of vectors; the same generator state gives the same
            result.
        n_init: independent seedings per palette of vectors; the lowest inertia wins.
        max_iter, tol: Lloyd's stopping rule for vectors, see :func:`lloyd`.
        sample_weight: optional non-negative weights ``(P, n)`` (e.g. counts of unique values).
        name: used in warnings (e.g. the parameter being clustered).

    A palette with fewer distinct points than ``k`` gets one centroid per distinct point plus
    distinct, unused placeholders beyond the data's maximum, and a ``UserWarning`` says so.

    Seeding and Lloyd run on each palette divided by :func:`palette_unit` (module docstring),
    so weights of 1e-20 or 1e20 get the centroids unit weights get, scaled.
    """
    xw, w = _checked(x, k, sample_weight, name, n_init)
    unit = palette_unit(xw)
    xw = xw / unit

    best: KMeansResult | None = None
    if xw.shape[-1] == 1:  # scalars: the optimum itself, no seeding and no restarts
        c, labels = _optimal_fits([(xw, k, w)])[0]
        best = KMeansResult(c, labels, _inertia(xw, c, labels, w))
    for _ in range(n_init if best is None else 0):
        seed_x, seed_w = _seed_subset(xw, w, generator)
        seeds = kmeans_plusplus(seed_x, k, generator, sample_weight=seed_w)
        result = _lloyd(xw, seeds, max_iter=max_iter, tol=tol, sample_weight=w)
        best = result if best is None else _keep_better(best, result)
    assert best is not None
    best = _scaled_back(best, unit)
    return KMeansResult(best.centroids.to(x.dtype), best.labels, best.inertia)


@torch.no_grad()
def kmeans_centroids(
    x: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    *,
    max_iter: int = 300,
    name: str | None = None,
) -> Tensor:
    """``kmeans(x, k, generator, max_iter=max_iter, name=name).centroids`` without the labels
    and the inertia: for scalars the optimal centroids alone, with no pass over the points
    after the solver's (seeding a 38.6M-weight embedding is then a few passes over it)."""
    if x.dim() != 3 or x.shape[-1] != 1:
        return kmeans(x, k, generator, max_iter=max_iter, name=name).centroids
    return kmeans_centroids_many([(x, k, name)])[0]


@torch.no_grad()
def kmeans_centroids_many(problems: Sequence[tuple[Tensor, int, str | None]]) -> list[Tensor]:
    """:func:`kmeans_centroids` of each ``(x, k, name)`` of scalar palettes ``x`` ``(P, n,
    1)`` (the tensors of a model), bit for bit, from one batched dynamic program
    (:func:`~lightning_dkm.engine.optimal1d.optimal_kmeans_1d_many`: many small tensors cost
    about what one does); the checks and warnings are :func:`kmeans`'s, per tensor. Keep the
    weights of one call within :data:`WAVE_WEIGHTS` (:func:`waves`)."""
    checked = [(_checked_scalars(x, k, None, name)[0], k, None) for x, k, name in problems]
    return [c.to(x.dtype) for (x, _, _), c in zip(problems, _optimal_centroids(checked),
                                                  strict=True)]


#: Weights clustered together at most by one batched call (:func:`waves`; a tensor above it
#: alone): their float32 values and the program's work on them are held at once.
WAVE_WEIGHTS = 1 << 25


def waves(sizes: Sequence[int], limit: int | None = None) -> list[list[int]]:
    """The indices of ``sizes`` (weights per tensor) in consecutive runs of at most ``limit``
    (default :data:`WAVE_WEIGHTS`) weights, a tensor larger than that alone: the batches of
    :func:`kmeans_scalars` and :func:`kmeans_centroids_many` over a model's tensors."""
    limit = WAVE_WEIGHTS if limit is None else limit
    runs: list[list[int]] = []
    held = limit
    for i, size in enumerate(sizes):
        if held + size > limit:
            runs.append([])
            held = 0
        runs[-1].append(i)
        held += size
    return runs


@torch.no_grad()
def kmeans_scalars(problems: Sequence[tuple[Tensor, int, Tensor | None, str | None]]
                   ) -> list[tuple[Tensor, Tensor]]:
    """``(centroids, labels)`` of :func:`kmeans` for each ``(x, k, sample_weight, name)`` of
    scalar palettes ``x`` ``(P, n, 1)`` (the tensors of a model), bit for bit, without the
    inertia: the tensors' dynamic programs run batched
    (:func:`~lightning_dkm.engine.optimal1d.optimal_kmeans_1d_many`), so many small tensors
    cost about what one does. The checks and warnings are :func:`kmeans`'s."""
    scaled, units = [], []
    for x, k, sample_weight, name in problems:
        xw, w = _checked_scalars(x, k, sample_weight, name)
        units.append(palette_unit(xw))
        scaled.append((xw / units[-1], k, w))
    return [((c * unit).to(x.dtype), labels) for (x, *_), unit, (c, labels)
            in zip(problems, units, _optimal_fits(scaled), strict=True)]


@torch.no_grad()
def kmeans_widths(x: Tensor, ks: Sequence[int], sample_weight: Tensor | None = None,
                  name: str | None = None) -> list[KMeansResult]:
    """``kmeans(x, k, sample_weight=sample_weight, name=name)`` of scalar palettes ``x``
    ``(P, n, 1)`` for each ``k`` of ``ks``, bit for bit (its checks and warnings per ``k``),
    from one dynamic program for all of them where the solver can
    (:func:`~lightning_dkm.engine.optimal1d.optimal_kmeans_1d_widths`: the largest ``k``'s
    program holds every smaller one's rows; 15 rows instead of 26 for 2, 4, 8 and 16
    centroids)."""
    if x.dim() != 3 or x.shape[-1] != 1:
        raise ValueError(f"x{_label(name)} must be scalar palettes (P, n, 1); got "
                         f"{tuple(x.shape)}")
    if not ks:
        return []
    for k in ks:
        xw, w = _checked(x, k, sample_weight, name)
    unit = palette_unit(xw)
    xw = xw / unit
    out = []
    for k, (centroids, filled) in zip(ks, optimal_kmeans_1d_widths(xw.squeeze(-1), ks, w),
                                      strict=True):
        c = _placed(xw, k, centroids, filled).to(xw.dtype).unsqueeze(-1)
        labels = _nearest_ascending(xw, c)
        best = _scaled_back(KMeansResult(c, labels, _inertia(xw, c, labels, w)), unit)
        out.append(KMeansResult(best.centroids.to(x.dtype), best.labels, best.inertia))
    return out


def _checked_scalars(x: Tensor, k: int, sample_weight: Tensor | None, name: str | None
                     ) -> tuple[Tensor, Tensor | None]:
    """:func:`_checked` of scalar palettes ``x`` ``(P, n, 1)`` (the batched solvers' input)."""
    if x.dim() != 3 or x.shape[-1] != 1:
        raise ValueError(f"x{_label(name)} must be scalar palettes (P, n, 1); got "
                         f"{tuple(x.shape)}")
    return _checked(x, k, sample_weight, name)


def _checked(x: Tensor, k: int, sample_weight: Tensor | None, name: str | None,
             n_init: int = 1) -> tuple[Tensor, Tensor | None]:
    """``x`` and ``sample_weight`` in (at least) float32, after the checks and the warning of
    :func:`kmeans`."""
    _check_k(x, k)
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1; got {n_init}")
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):  # NaN propagates
        raise ValueError(f"k-means input{_label(name)} contains NaN or Inf values")
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work_dtype)
    w = None if sample_weight is None else sample_weight.to(work_dtype)
    _warn_if_few_distinct(xw, k, name)
    return xw, w


def _optimal_centroids(problems: Sequence[tuple[Tensor, int, Tensor | None]]
                       ) -> list[Tensor]:
    """The optimal centroids ``(P, k, 1)`` of scalar palettes ``x`` ``(P, n, 1)`` of each
    ``(x, k, w)`` (:func:`~.optimal1d.optimal_kmeans_1d_many`: one batched program),
    ascending; a palette with fewer distinct values than ``k`` gets distinct placeholders
    beyond its data (:func:`_placeholder_centroids`, on the palette divided by its
    :func:`palette_unit`) for the centroids left without members. The solver works in
    float64 and scales exactly with a power of two, so any magnitude of ``x`` is fine as it
    is."""
    solved = optimal_kmeans_1d_many([(x.squeeze(-1), k, w) for x, k, w in problems])
    return [_placed(x, k, centroids, filled).to(x.dtype).unsqueeze(-1)
            for (x, k, _), (centroids, filled) in zip(problems, solved, strict=True)]


def _placed(x: Tensor, k: int, centroids: Tensor, filled: Tensor) -> Tensor:
    """The solver's ``centroids`` ``(P, k)`` of palettes ``x`` ``(P, n, 1)``, those without
    members (not ``filled``) replaced by distinct placeholders beyond the data."""
    if bool(filled.all()):
        return centroids
    unit = palette_unit(x)
    placeholders = (_placeholder_centroids(x / unit, k) * unit).squeeze(-1)
    return torch.where(filled, centroids, placeholders.to(centroids))


def _optimal_fits(problems: Sequence[tuple[Tensor, int, Tensor | None]]
                  ) -> list[tuple[Tensor, Tensor]]:
    """:func:`_optimal_centroids` of each problem and the labels of its points."""
    return [(c, _nearest_ascending(x, c))
            for (x, _, _), c in zip(problems, _optimal_centroids(problems), strict=True)]


def _nearest_ascending(x: Tensor, c: Tensor) -> Tensor:
    """:func:`nearest_centroid` for scalars ``x`` ``(P, n, 1)`` and strictly ascending
    centroids ``c`` ``(P, k, 1)`` (the optimal ones): the number of midpoints below each
    point (a point on a midpoint goes to the lower centroid, as ``argmin`` sends it), no sort
    and no comparison of distances. Up to 16 centroids it is counted, one comparison pass per
    midpoint over a cache-sized piece of the points at a time (about 2x faster than the
    sorted search, ``searchsorted``, used above, or than the passes over all the points)."""
    midpoints = (c[:, 1:] + c[:, :-1]) / 2  # (P, k - 1, 1)
    if c.shape[1] > _COUNTED_LABELS:
        return torch.searchsorted(midpoints.squeeze(-1).contiguous(),
                                  x.squeeze(-1).contiguous())
    points = x.squeeze(-1)
    labels = torch.zeros(points.shape, dtype=torch.uint8, device=x.device)
    step = max(1, _LABEL_PIECE // points.shape[0])  # columns at once
    above = torch.empty(points[:, :step].shape, dtype=torch.bool, device=x.device)
    for begin in range(0, points.shape[1], step):
        piece, count = points[:, begin : begin + step], labels[:, begin : begin + step]
        for j in range(c.shape[1] - 1):
            count.add_(torch.gt(piece, midpoints[:, j], out=above[:, : piece.shape[1]]))
    return labels.long()


def _seed_subset(
    x: Tensor, w: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """At most ``_MAX_SEED_POINTS`` points per palette (drawn without replacement, seeded)."""
    n = x.shape[1]
    if n <= _MAX_SEED_POINTS:
        return x, w
    idx = torch.randperm(n, generator=generator, device="cpu")[:_MAX_SEED_POINTS].to(x.device)
    return x[:, idx], None if w is None else w[:, idx]


def _keep_better(a: KMeansResult, b: KMeansResult) -> KMeansResult:
    take_b = b.inertia < a.inertia
    return KMeansResult(
        torch.where(take_b[:, None, None], b.centroids, a.centroids),
        torch.where(take_b[:, None], b.labels, a.labels),
        torch.where(take_b, b.inertia, a.inertia),
    )


def _label(name: str | None) -> str:
    return f" of {name!r}" if name else ""


def _distinct_count(points: Tensor) -> int:
    """Distinct points (rows) of ``points`` (n, d); a flat sort for scalars (much faster than
    ``unique(dim=0)``, the same count)."""
    if points.shape[1] == 1:
        return int(torch.unique(points.reshape(-1)).numel())
    return int(torch.unique(points, dim=0).shape[0])


def _warn_if_few_distinct(x: Tensor, k: int, name: str | None) -> None:
    # Counting a palette's distinct points is a sort, O(n log n): 3 minutes for a 38.6M-weight
    # embedding on one core. Its first 64 k points usually hold k distinct ones already, which
    # settles it exactly; only a palette short of values there is counted in full.
    counts = []
    for p in range(x.shape[0]):
        head = _distinct_count(x[p, : 64 * k])
        counts.append(head if head >= k else _distinct_count(x[p]))
    short = [(p, c) for p, c in enumerate(counts) if c < k]
    if short:
        p, c = short[0]
        warnings.warn(
            f"{len(short)} palette(s){_label(name)} have fewer distinct values than k={k} "
            f"(palette {p} has {c}); the surplus centroids are placed outside the data and stay "
            "unused",
            UserWarning,
            stacklevel=3,
        )
