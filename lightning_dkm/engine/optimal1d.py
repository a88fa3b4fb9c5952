r"""Optimal (exact) k-means of scalars: a dynamic program over sorted values.

In one dimension the clusters of an optimal k-means partition are contiguous runs of the
sorted values, so the best partition of ``m`` sorted values into ``k`` runs is a dynamic
program (Wang & Song 2011, Ckmeans.1d.dp; Grønlund et al. 2017): with :math:`D_j(i)` the least
cost of the first ``i + 1`` values in ``j + 1`` runs,

.. math::

    D_0(i) = c(0, i), \qquad D_j(i) = \min_{j \le t \le i} D_{j-1}(t - 1) + c(t, i),

where :math:`c(t, i) = \sum w v^2 - (\sum w v)^2 / \sum w` over values ``t..i`` (weight ``w``)
is the run's sum of weighted squared distances to its mean, from float64 prefix sums of
:math:`w`, :math:`w v` and :math:`w v^2` (``v`` minus the palette's mean, or on the grid
below its smallest value, so that the differences of prefix sums keep their precision). The
cost is a Monge array, so the best ``t`` does not decrease as ``i`` grows; each row of the
program is found by divide and conquer
(the best ``t`` of the middle ``i`` bounds both halves; the last ``i`` comes first, its best
``t`` bounding every other from above), ``O(m log m)`` per row and
``O(k m log m)`` in all. Every level of the recursion is one vectorised step over all its
nodes and all palettes, so the Python loop runs ``k log2 m`` times whatever the number of
palettes; on the CPU, where the native library is built (:mod:`.native`), one C loop runs the
whole program instead (``dkm_optimal_choices``: the same operations on every value, so the
same choices bit for bit, without the per-level operator calls: 0.009 s against 0.117 s for
36 palettes of 1,025 bins at 2-16 runs, process CPU, a throwaway timer).

**What is clustered.** The program runs on *bins*: runs of sorted values that stay together,
each with its weight and the exact float64 sum of its values, a point mass at its mean (a
run's cost then differs from its values' by their spread inside the bins, the same for every
partition that keeps the bins whole):

* a palette of at most :func:`bin_budget` weights (8,192 for one palette): its distinct
  values (ties merged, counts and ``sample_weight`` summed), so the result is the exact
  optimum;
* a larger palette: a grid of about two equal power-of-two cells per weight (2**18 to
  :data:`GRID_CELLS`, 2**20) over its range, in one pass over the weights (a cell's weight
  and sum). The program first runs on a
  coarse set of cuts between cells (evenly spaced over the occupied cells, plus where the
  values cross evenly spaced levels, so that an outlier is never merged with the bulk), then
  Lloyd's algorithm on the cells moves the boundaries, then it runs again on *foveated* cuts:
  the coarse ones plus, around every boundary, cuts 8 times denser at each level down to every
  cell (:func:`_foveated`). The result is optimal among partitions whose boundaries lie on
  those cuts, each boundary at single-cell resolution; measured against the exact program on
  every value, its inertia was within 2e-7 (Student-t with a 340-sigma outlier, where the
  cells are widest) and 4e-10 (normal) of the optimum (``benchmarks/perf_kmeans.py``,
  ``tests/test_optimal1d.py``).

The grid and the sums scale exactly with a power of two, so ``2**e * x`` gets ``2**e`` times
the centroids of ``x`` bit for bit, and float64 holds the squares of any float32 weight:
weights of 1e-20 and 1e20 cluster as unit ones do. Nothing is random: every process gets
the same centroids.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import native

__all__ = ["MAX_BINS", "bin_budget", "optimal_kmeans_1d", "optimal_kmeans_1d_many",
           "optimal_kmeans_1d_widths"]

#: The dynamic program runs on at most this many bins per palette (its cost is linear in it);
#: fewer, down to ``64 k``, when many palettes share one call (:func:`bin_budget`).
MAX_BINS = 1 << 13
#: Cells of the finest grid over a larger palette's range (at most; about 2 per weight).
GRID_CELLS = 1 << 20
# Grid cells binned at once (palettes x cells), bounding the two float64 tables.
_TABLE_ENTRIES = 1 << 22
# Weights binned at once (their float64 temporaries, 512 KiB each, stay in cache: 1.3x faster
# than 2**20 at a time).
_CHUNK = 1 << 16
# Foveated cuts: this many more per level, and at most this many rounds of them.
_FOVEA = 8
_ROUNDS = 1
# Palettes x bins x k of the program's choices kept at once (int32).
_CHOICE_ENTRIES = 1 << 25
# Bins (at most) of the palettes being solved at once by optimal_kmeans_1d_many, each with
# its float64 prefix sums: many tensors' programs run batched within this bound.
_HELD_BINS = 1 << 24
_TINY = torch.finfo(torch.float64).tiny


class _Bins(NamedTuple):
    """Runs of sorted values that stay together, each a point mass at its exact mean: per bin
    its weight and the weighted sum of its values minus ``center``, padded to a common width
    with empty bins (weight 0). A run's cost about its own mean differs from that of its
    values by their spread inside the bins, the same for every partition that keeps the bins
    whole, so the partitions compare alike."""

    weight: Tensor  # (P, M) float64
    total: Tensor  # (P, M)
    center: Tensor  # (P, 1) float64
    #: (P, C) ascending bin positions where the values cross C equally spaced levels (a grid's)
    levels: Tensor | None = None


def bin_budget(palettes: int, k: int) -> int:
    """The most bins per palette that the dynamic program takes when ``palettes`` palettes
    are clustered together: :data:`MAX_BINS` for up to 8 of them, then less, so that the total
    stays about 65,536, but never below ``64 k`` (64 bins per centroid)."""
    return max(min(MAX_BINS, (1 << 16) // max(palettes, 1)), 64 * k)


@torch.no_grad()
def optimal_kmeans_1d(x: Tensor, k: int, sample_weight: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """The optimal ``k`` centroids of every palette of scalars ``x`` ``(P, n)``, by the
    dynamic program of the module docstring, each value weighted by ``sample_weight``
    ``(P, n)`` (>= 0; ``None``: all 1). A palette of at most :func:`bin_budget` values is
    solved on its distinct values (exact); a larger one on the cells of a grid
    (:func:`_grid_cells`, :func:`_foveated`).

    Returns ``(centroids, filled)``: centroids ``(P, k)`` float64, ascending, and ``filled``
    ``(P, k)`` bool, false for the centroids that a palette with fewer than ``k`` distinct
    values (of positive weight) leaves without members (their values are arbitrary: the
    caller places them).
    """
    return optimal_kmeans_1d_many([(x, k, sample_weight)])[0]


@torch.no_grad()
def optimal_kmeans_1d_many(problems: Sequence[tuple[Tensor, int, Tensor | None]]
                           ) -> list[tuple[Tensor, Tensor]]:
    """:func:`optimal_kmeans_1d` of every ``(x, k, sample_weight)`` of ``problems`` (the
    tensors of a model, say), each bit for bit what it gets alone, in one pass: the dynamic
    programs of the same size (``k`` and bins per palette) run as one batched program, so
    the program's Python loop (``k log2 M`` vectorised steps) runs once per size instead of
    once per tensor, which is what clustering many small tensors costs otherwise. A palette's
    program does not depend on the others in its batch, so batching changes no result."""
    jobs, sizes = [], []
    for x, k, w in problems:
        _check_problem(x, w)
        P, n = x.shape
        parts = _problem_parts(x, k)
        jobs.append([_solve(x[part], k, None if w is None else w[part], bin_budget(P, k))
                     for part in parts])
        sizes += [(part.stop - part.start) * min(n, _cell_count(n)) for part in parts]
    results = _drive([job for parts in jobs for job in parts], sizes)
    out = []
    for (x, k, _), parts in zip(problems, jobs, strict=True):
        mine, results = results[: len(parts)], results[len(parts) :]
        out.append((torch.cat([c for c, _ in mine]), torch.cat([f for _, f in mine])) if mine
                   else (x.new_empty(0, k, dtype=torch.float64),
                         x.new_empty(0, k, dtype=torch.bool)))
    return out


@torch.no_grad()
def optimal_kmeans_1d_widths(x: Tensor, ks: Sequence[int], sample_weight: Tensor | None = None
                             ) -> list[tuple[Tensor, Tensor]]:
    """:func:`optimal_kmeans_1d` of ``x`` for each ``k`` of ``ks``, bit for bit, from one
    dynamic program where the palettes are solved on their distinct values for every ``k``
    (at most :func:`bin_budget` of them for the smallest) and hold at least ``max(ks)`` of
    them: row ``j`` of the program's table is the optimum of the first ``i + 1`` bins in
    ``j + 1`` runs whatever the number of runs asked for, so the program for the largest
    ``k`` computes every row that a smaller one's own program would (its last row's one
    entry, the last bin, is the first one computed there too, with the same bounds), and
    each ``k``'s partition is traced back from its own row. The program's rows are its cost:
    1 + 3 + 7 + 15 rows for 2, 4, 8 and 16 centroids apart, 15 together. Otherwise each
    ``k`` is solved on its own (:func:`optimal_kmeans_1d_many`)."""
    _check_problem(x, sample_weight)
    P, n = x.shape
    top = max(ks)
    if n > bin_budget(P, min(ks)):
        return optimal_kmeans_1d_many([(x, k, sample_weight) for k in ks])
    bins = _distinct_bins(x, sample_weight)
    width = bins.weight.shape[1]
    if width < top:  # a smaller program would pad differently
        return optimal_kmeans_1d_many([(x, k, sample_weight) for k in ks])
    prefix = _prefix(bins)
    step = max(1, _CHOICE_ENTRIES // (top * width))
    parts = [_optimal_starts(prefix[:, part], ks) for part in _parts(P, step)]
    return [_centroids(prefix, torch.cat([starts[i] for starts in parts]), bins.center)
            for i in range(len(ks))]


def _check_problem(x: Tensor, sample_weight: Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (P, n); got {tuple(x.shape)}")
    if sample_weight is not None and sample_weight.shape != x.shape:
        raise ValueError(
            f"sample_weight must have the shape of x {tuple(x.shape)}; got "
            f"{tuple(sample_weight.shape)}"
        )


def _problem_parts(x: Tensor, k: int) -> list[slice]:
    """The palettes of ``x`` binned at once: bounding the program's choices (distinct
    values) or the grid's tables."""
    P, n = x.shape
    if n <= bin_budget(P, k):
        return _parts(P, max(1, _CHOICE_ENTRIES // (k * n)))
    return _parts(P, max(1, _TABLE_ENTRIES // _cell_count(n)))


def _cell_count(n: int) -> int:
    """The grid's cells for palettes of ``n`` values: about 2 per value, 2**18 to
    :data:`GRID_CELLS`, a power of two."""
    return min(GRID_CELLS, max(1 << 18, 1 << (2 * n - 1).bit_length()))


#: A palette set's solution in steps: it yields prefix sums ``(3, P, M + 1)`` and the number
#: of runs for :func:`_optimal_starts`, is sent their run starts, and returns ``(centroids,
#: filled)``.
_Solver = Generator[tuple[Tensor, int], Tensor, tuple[Tensor, Tensor]]


def _solve(x: Tensor, k: int, w: Tensor | None, budget: int) -> _Solver:
    """The centroids of palettes ``x`` ``(P, n)`` with at most ``budget`` bins each in the
    program, as a :data:`_Solver`: on the distinct values (``n <= budget``, or a grid with
    fewer than ``k`` occupied cells), else on the grid's cells."""
    n = x.shape[1]
    if n > budget:
        bins = _grid_cells(x, w, _cell_count(n), budget // 4)
        if int((bins.weight > 0).sum(1).min()) >= k:
            prefix = _prefix(bins)
            if bins.weight.shape[1] <= budget:
                starts = yield prefix, k
            else:
                starts = yield from _foveated(prefix, (bins.weight > 0).sum(1), bins.levels, k,
                                              budget)
            return _centroids(prefix, starts, bins.center)
    bins = _distinct_bins(x, w)  # too few occupied cells for k runs: the distinct values decide
    prefix = _prefix(bins)
    starts = yield prefix, k
    return _centroids(prefix, starts, bins.center)


def _drive(solvers: list[_Solver], sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Every solver's result, running them side by side: each round, the programs that the
    waiting solvers ask for are grouped by size (runs, bins) and each group is solved by one
    :func:`_optimal_starts` over all their palettes (in slices that bound its choices).
    Solvers start in order while those started hold at most :data:`_HELD_BINS` bins
    (``sizes``: each one's bound), so that memory stays bounded however many there are."""
    results: list[Any] = [None] * len(solvers)
    waiting: dict[int, tuple[Tensor, int]] = {}
    started = held = 0
    while started < len(solvers) or waiting:
        while started < len(solvers) and (held == 0 or held + sizes[started] <= _HELD_BINS):
            held += sizes[started]
            started += 1
            held -= _advance(solvers, started - 1, None, waiting, results) * sizes[started - 1]
        groups: dict[tuple, list[int]] = {}
        for i, (prefix, k) in waiting.items():
            groups.setdefault((k, prefix.shape[2], prefix.dtype, prefix.device), []).append(i)
        asked, waiting = waiting, {}
        for (k, M1, *_), members in groups.items():
            prefix = torch.cat([asked[i][0] for i in members], 1)
            step = max(1, _CHOICE_ENTRIES // (k * max(M1 - 1, k)))
            starts = torch.cat([_optimal_starts(prefix[:, part], [k])[0]
                                for part in _parts(prefix.shape[1], step)])
            for i, mine in zip(members, starts.split([asked[i][0].shape[1] for i in members]),
                               strict=True):
                held -= _advance(solvers, i, mine, waiting, results) * sizes[i]
    return results


def _advance(solvers: list[_Solver], i: int, sent: Tensor | None, waiting: dict,
             results: list) -> bool:
    """Send ``sent`` to solver ``i``: its next request goes to ``waiting``, or its result to
    ``results`` (then True: it is done)."""
    try:
        waiting[i] = solvers[i].send(sent)  # type: ignore[arg-type]
    except StopIteration as done:
        results[i] = done.value
        return True
    return False


def _parts(P: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, P)) for start in range(0, P, step)]


# -- bins ---------------------------------------------------------------------------------------
def _distinct_bins(x: Tensor, w: Tensor | None) -> _Bins:
    """Each palette's distinct values, ascending, with their summed weights."""
    P, n = x.shape
    values, order = torch.sort(x, dim=1, stable=True)
    values = values.double()
    weights = (torch.ones_like(values) if w is None
               else w.gather(1, order).to(torch.float64))
    new = torch.ones(P, n, dtype=torch.bool, device=x.device)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.cumsum(1) - 1
    width = int(group[:, -1].max()) + 1
    center = ((weights * values).sum(1, keepdim=True)
              / weights.sum(1, keepdim=True).clamp_min(_TINY))
    tables = torch.zeros(2, P, width, dtype=torch.float64, device=x.device)
    tables[0].scatter_add_(1, group, weights)
    tables[1].scatter_add_(1, group, weights * (values - center))
    return _Bins(tables[0], tables[1], center)


def _grid_cells(x: Tensor, w: Tensor | None, cells: int, levels: int) -> _Bins:
    """Per palette ``cells`` equal cells from its smallest value up, each a power of two wide
    (just over ``range / cells``), with the weight and the sum of the values in each: the
    occupied ones in order (then empty padding), and where the values cross ``levels``
    equally spaced levels (:attr:`_Bins.levels`). A value's cell is ``floor((x - min) /
    width)``, which ascends with the value, so every cell holds a run of the sorted values.
    The sums are of ``x - min`` in float64 (exact for float32 weights)."""
    P, n = x.shape
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)  # faster than aminmax
    low = low.double()
    span = high.double() - low  # exact for float32 weights, and below 2**exponent
    # 1 / width, width = 2**exponent / cells: a power of two (float64 holds any such width)
    inverse = torch.ldexp(torch.ones_like(span), cells.bit_length() - 1
                          - torch.frexp(span).exponent)
    size = cells + 1  # the top value's cell may round to ``cells``
    tables = torch.zeros(2, P * size, dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK // P)  # columns at once
    ones = torch.ones(P * min(step, n), dtype=torch.float64, device=x.device)
    for begin in range(0, n, step):
        deviation = x[:, begin : begin + step].to(torch.float64, copy=True).sub_(low)
        cell = torch.mul(deviation, inverse).long()  # floor: deviation >= 0
        if P > 1:
            cell += (torch.arange(P, device=x.device) * size).unsqueeze(1)
        cell = cell.view(-1)
        if w is None:  # counts (a contiguous source: an expanded one is several times slower)
            tables[0].scatter_add_(0, cell, ones[: cell.numel()])
        else:
            weight = w[:, begin : begin + step].to(torch.float64)
            tables[0].scatter_add_(0, cell, weight.view(-1))
            deviation.mul_(weight)
        tables[1].scatter_add_(0, cell, deviation.view(-1))
    # the occupied cells, compacted: their flat (palette, cell) positions in order
    found = (tables[0] > 0).nonzero().squeeze(1)
    starts = torch.arange(P + 1, device=x.device) * size
    first = torch.searchsorted(found, starts)  # each palette's first entry of ``found``
    width = int(first.diff().max())
    palette = torch.div(found, size, rounding_mode="floor")
    compact = tables.new_zeros(2, P, width)
    compact[:, palette, torch.arange(found.numel(), device=x.device) - first[palette]] = (
        tables[:, found])
    # occupied cells up to each level's cell (inclusive)
    marks = torch.arange(cells // levels - 1, cells, cells // levels, device=x.device)
    crossings = (torch.searchsorted(found, starts[:-1, None] + marks, right=True)
                 - first[:-1, None])
    return _Bins(compact[0], compact[1], low, crossings)


# -- the dynamic program ------------------------------------------------------------------------
def _prefix(bins: _Bins) -> Tensor:
    """``(3, P, M + 1)``: the prefix sums of each bin's weight ``w``, ``w m`` and ``w m**2``
    (``m`` its mean minus the centre), from 0."""
    weight, total = bins.weight, bins.total
    spread = total.square() / weight.clamp_min(_TINY)
    sums = torch.stack((weight, total, spread)).cumsum(2)
    return torch.cat((sums.new_zeros(3, weight.shape[0], 1), sums), 2)


def _centroids(prefix: Tensor, starts: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of each run starting at ``starts`` (P, k) (bin indices into ``prefix``; the
    last run ends at the last bin) and whether it holds weight."""
    _, P, M1 = prefix.shape
    k = starts.shape[1]
    ends = torch.cat((starts[:, 1:], torch.full_like(starts[:, :1], M1 - 1)), 1)
    runs = prefix[:2].gather(2, ends.expand(2, P, k)) - prefix[:2].gather(2, starts.expand(2, P, k))
    return runs[1] / runs[0].clamp_min(_TINY) + center, runs[0] > 0


def _foveated(prefix: Tensor, occupied: Tensor, levels: Tensor, k: int, budget: int
              ) -> Generator[tuple[Tensor, int], Tensor, Tensor]:
    """The run starts (P, k) of a partition of the cells of ``prefix`` (each palette's
    ``occupied`` cells first): the optimum on ``budget / 4`` cuts evenly spaced over the
    cells and the cuts at ``levels`` (where the values cross evenly spaced levels: a run of
    far apart values, an outlier and the values next to it, is then split), moved by
    Lloyd's algorithm on the cells (:func:`_lloyd_cells`), then the optimum on a foveated
    set of cuts: the even ones plus, around each boundary of the previous partition, cuts
    ``_FOVEA`` times denser at each level down to every cell (spacing ``s / 8, s / 64, ...,
    1`` within ``s, s / 8, ..., 8`` cells of it, ``s`` the even spacing), again until the
    boundaries stay (at most ``_ROUNDS`` times). Every partition so found contains the
    previous one's boundaries among its cuts, so its cost never rises."""
    _, P, _ = prefix.shape
    device = prefix.device
    coarse = max(k, budget // 4)
    cuts = (torch.arange(coarse + 1, device=device) * occupied.unsqueeze(1)) // coarse
    cuts = torch.cat((cuts, levels), 1).sort(1).values
    spacing = -(-int(occupied.max()) // coarse)
    ladder = []
    while spacing > 1:
        spacing = -(-spacing // _FOVEA)
        ladder.append(spacing)
    offsets = torch.cat([torch.arange(-_FOVEA, _FOVEA + 1, device=device) * s for s in ladder])
    starts = cuts.gather(1, (yield _gathered(prefix, cuts), k))
    starts = _lloyd_cells(prefix, starts, occupied)
    for _ in range(_ROUNDS):
        window = (starts[:, 1:].unsqueeze(-1) + offsets).view(P, -1)
        window = torch.minimum(window.clamp_min(0), occupied.unsqueeze(1))
        chosen = torch.cat((cuts, window), 1).sort(1).values
        moved = chosen.gather(1, (yield _gathered(prefix, chosen), k))
        if torch.equal(moved, starts):
            break
        starts = moved
    return starts


def _gathered(prefix: Tensor, cuts: Tensor) -> Tensor:
    """The prefix sums of the bins between consecutive ``cuts`` (P, C) (cell positions)."""
    return prefix.gather(2, cuts.expand(3, *cuts.shape))


def _lloyd_cells(prefix: Tensor, starts: Tensor, occupied: Tensor, max_iter: int = 10
                 ) -> Tensor:
    """Lloyd's algorithm on the cells (points at their means, weighted by their mass) from
    the runs starting at ``starts``, as run starts: each round moves every boundary to the
    first cell past the midpoint of its neighbouring means, until none moves."""
    _, P, M1 = prefix.shape
    weight = prefix[0].diff(dim=1)
    means = prefix[1].diff(dim=1) / weight.clamp_min(_TINY)
    # an unoccupied (padding) cell sorts last, past every midpoint
    means = torch.where(torch.arange(M1 - 1, device=prefix.device) < occupied.unsqueeze(1),
                        means, torch.finfo(torch.float64).max).contiguous()
    for _ in range(max_iter):
        c, filled = _centroids(prefix, starts, torch.zeros(P, 1, dtype=prefix.dtype,
                                                          device=prefix.device))
        if not bool(filled.all()):
            break
        midpoints = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        moved = torch.cat((starts[:, :1], torch.searchsorted(means, midpoints, right=True)), 1)
        if torch.equal(moved, starts):
            break
        starts = moved
    return starts


def _mean_term(prefix: Tensor, start: Tensor, w: Tensor, s: Tensor) -> Tensor:
    r""":math:`(\sum w m)^2 / \sum w` of runs from ``start`` (flat indices into the ``(3, P *
    (M + 1))`` prefix sums of ``w``, ``w m`` and ``w m**2`` of the bins) to where the prefix
    sums of ``w`` and ``w m`` are ``w`` and ``s`` (overwritten); 0 for a run without weight: a
    run's cost, the weighted squared distances of its bins' means to its mean, is its
    :math:`\sum w m^2` less this."""
    w = w.sub_(prefix[0].index_select(0, start))
    s = s.sub_(prefix[1].index_select(0, start))
    return s.square_().div_(w.clamp_min_(_TINY))


def _levels(M: int, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The divide-and-conquer tree over ``i`` in ``[0, M)``, level by level: each node's middle
    ``i`` and the middles of its nearest ancestors to the left and right (-1 where none),
    whose best ``t`` bound its own. The root is the last ``i``, the right ancestor of the tree
    over the rest: its best ``t`` bounds every node from above (else the nodes down the right
    edge search up to their own ``i``: 1.6x the candidates on MiniLM), and it is all that the
    program's last row needs."""
    levels = [(torch.tensor([M - 1], device=device), torch.tensor([-1], device=device),
               torch.tensor([-1], device=device))]
    rest = min(M - 1, 1)  # the tree over [0, M - 2], if any
    # built on the CPU whatever the default device (then moved): a few ints per node
    lo = torch.zeros(rest, dtype=torch.long, device="cpu")
    hi = torch.full((rest,), M - 2, device="cpu")
    left, right = torch.full((rest,), -1, device="cpu"), torch.full((rest,), M - 1, device="cpu")
    while lo.numel():
        mid = (lo + hi) // 2
        levels.append((mid.to(device), left.to(device), right.to(device)))
        a, b = lo <= mid - 1, mid + 1 <= hi  # children: [lo, mid - 1] and [mid + 1, hi]
        lo, hi, left, right = (
            torch.stack((lo, mid + 1), 1)[torch.stack((a, b), 1)],
            torch.stack((mid - 1, hi), 1)[torch.stack((a, b), 1)],
            torch.stack((left, mid), 1)[torch.stack((a, b), 1)],
            torch.stack((mid, right), 1)[torch.stack((a, b), 1)],
        )
    return levels


def _optimal_starts(prefix: Tensor, ks: Sequence[int]) -> list[Tensor]:
    """For each ``k`` of ``ks``, ``(P, k)``: where each run of an optimal partition into
    ``k`` runs starts, for the prefix sums ``(3, P, M + 1)`` of ``M`` bins, each traced back
    from its own row of one table for ``max(ks)`` runs (:func:`optimal_kmeans_1d_widths`).
    With fewer bins than runs (``M < k``, one ``k`` only) the last runs are empty: they start
    at ``M``."""
    k = max(ks)
    _, P, M1 = prefix.shape
    bins = M1 - 1
    if bins < k:  # pad with empty bins: runs of cost 0
        prefix = torch.cat((prefix, prefix[:, :, -1:].expand(3, P, k - bins)), 2)
        M1 = k + 1
    M = M1 - 1
    loops = native.loops_for(prefix)
    table = None if loops is None else choices_by_loop(loops, prefix, k)
    if table is None:
        table = choices_by_ops(prefix, k)
    return [_traced(table, runs, M, bins) for runs in ks]


def choices_by_loop(loops: native.Kernels, prefix: Tensor, k: int) -> Tensor | None:
    """:func:`choices_by_ops` by the native library's loop (``None`` where it does not take
    ``prefix``)."""
    return loops.optimal_choices(prefix.contiguous(), k, _TINY)


def choices_by_ops(prefix: Tensor, k: int) -> Tensor:
    """The program's table of choices ``(k, P, M)`` int32 (row ``j``, palette, bin ``i``: the
    start of the last of ``j + 1`` runs ending at ``i``) for the prefix sums ``(3, P, M + 1)``
    of ``M >= k`` bins, by vectorised PyTorch ops (what the native loop gives bit for bit)."""
    _, P, M1 = prefix.shape
    M = M1 - 1
    device = prefix.device
    flat = prefix.reshape(3, -1)
    base = torch.arange(P, device=device).unsqueeze(1) * M1  # each palette's first flat index
    ends = (base + torch.arange(1, M1, device=device)).view(-1)
    w, s, q = (flat[r].index_select(0, ends) for r in range(3))
    D = q.sub_(_mean_term(flat, base.expand(P, M).reshape(-1), w, s)).view(P, M)
    choice = torch.zeros(k, P, M, dtype=torch.int32, device=device)  # best t per (row, i)
    # per palette side by side: this row's best t, the bound where a node has no ancestor to
    # its left (j) and to its right (M - 1), and the previous row's best t (flat: one read
    # of every node's three bounds; int32 as ``choice``)
    bounds = torch.zeros(P, 2 * M + 2, dtype=torch.int32, device=device)
    bounds[:, M + 1] = M - 1
    palette = torch.arange(P, device=device).view(P, 1, 1) * (2 * M + 2)
    # the levels that some row reads (two runs: only the last row's root), each with the
    # prefix sums at its i + 1 (3 P M float64 over all levels, as many as ``prefix``)
    tree = _levels(M, device)[: 1 if k == 2 else None]
    levels = [_level(mid, left, right, M, base, flat) for mid, left, right in tree]
    never = torch.tensor(torch.iinfo(torch.int32).max, dtype=torch.int32, device=device)
    for j in range(1, k):
        if j == k - 1:  # the last row: only its last ``i`` (the root) is read
            levels = levels[:1]
        if j > 1:  # a row's best t is at least the previous row's (monotone in j too)
            bounds[:, M + 2 :] = bounds[:, :M]
        bounds[:, M] = j
        read = bounds.view(-1)
        # D_{j-1}(t - 1) - q(t) at flat index base + t (t >= j >= 1): a run from t to i then
        # costs this plus q(i + 1) less its mean term, and q(i + 1) is the same for every t
        before = torch.cat((D.new_full((P, 1), float("inf")), D), 1).view(-1).sub_(flat[2])
        row = torch.empty_like(D)
        for level in levels:
            N = level.mid.numel()
            bound = read.index_select(0, (palette + level.bounds).view(-1)).view(P, 3, N)
            lo = torch.maximum(bound[:, 0], bound[:, 2])
            hi = torch.minimum(bound[:, 1], level.mid)
            count = hi.sub_(lo).add_(1).view(-1)
            empty = count < 1  # i < j: no partition; any t (j) keeps the choices monotone
            count.clamp_(min=1)
            offset = count.cumsum(0)
            total = int(offset[-1])
            offset -= count  # where each node's candidates begin
            # each candidate's node (repeat_interleave, without its parallel region: on a
            # busy CPU that costs milliseconds a call)
            node = torch.zeros(total, dtype=torch.long, device=device)
            node.index_fill_(0, offset[1:], 1)
            node = node.cumsum_(0)
            start = lo.add_(base).view(-1)  # each node's first candidate, flat
            # t_flat = position + first, int32 (faster reads; P (M + 1) < _CHOICE_ENTRIES)
            first = (start - offset).int()
            t = torch.arange(total, dtype=torch.int32, device=device).add_(
                first.index_select(0, node))
            # the sums at each node's i + 1 are the level's, read once for every row
            value = before.index_select(0, t).sub_(_mean_term(
                flat, t, level.w.index_select(0, node), level.s.index_select(0, node)))
            least = value.new_full((P * N,), float("inf")).scatter_reduce_(
                0, node, value, "amin")
            candidate = torch.where(value <= least.index_select(0, node), t, never)
            arg = never.expand(P * N).clone().scatter_reduce_(0, node, candidate, "amin")
            arg = torch.where(empty, start, arg)
            least = torch.where(empty, float("inf"), least.add_(level.q))
            row[:, level.mid] = least.view(P, N)
            bounds[:, level.mid] = (arg.view(P, N) - base).int()
        choice[j] = bounds[:, :M]
        D = row
    return choice


class _Level(NamedTuple):
    """One level of the divide-and-conquer tree (:func:`_levels`) as :func:`_optimal_starts`
    reads it: its nodes' middle ``i``; where its nodes' bounds lie in a palette's part of the
    flat ``(P, 2 M + 2)`` table of best ``t`` (``(3, N)``: the left ancestor's or ``M``, the
    right one's or ``M + 1``, the previous row's at ``i``); and the prefix sums ``w``, ``w m``
    and ``q`` at ``i + 1`` per palette and node (``(P N,)``), the same in every row."""

    mid: Tensor
    bounds: Tensor
    w: Tensor
    s: Tensor
    q: Tensor


def _level(mid: Tensor, left: Tensor, right: Tensor, M: int, base: Tensor, flat: Tensor
           ) -> _Level:
    """A level of :func:`_levels` as :class:`_Level`, for palettes at ``base`` in ``flat``."""
    end = (mid + 1 + base).view(-1)
    w, s, q = (flat[r].index_select(0, end) for r in range(3))
    return _Level(mid, torch.stack((torch.where(left >= 0, left, M),
                                    torch.where(right >= 0, right, M + 1), mid + M + 2)),
                  w, s, q)


def _traced(choice: Tensor, k: int, M: int, bins: int) -> Tensor:
    """``(P, k)``: the run starts of the optimal partition into ``k`` runs, traced back from
    row ``k - 1`` of the program's ``choice`` table ``(rows, P, M)`` at the last bin."""
    P = choice.shape[1]
    starts = torch.zeros(P, k, dtype=torch.long, device=choice.device)
    i = torch.full((P, 1), M - 1, dtype=torch.long, device=choice.device)
    for j in range(k - 1, 0, -1):
        t = choice[j].gather(1, i).long()
        starts[:, j : j + 1] = t
        i = t - 1
    return starts.clamp_max_(bins)
