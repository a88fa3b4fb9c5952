r"""Per-tensor bit widths under a size budget: what ``average_bits`` chooses (issue #24).

Uniform widths spend the same bits on every tensor whether the loss cares about it or not.
Given a budget of ``average_bits = B``, :func:`plan_widths` gives each tensor to cluster a width
:math:`b_t` from ``widths`` (default 1..8) so that

.. math::

    \sum_t \mathrm{bytes}_t(b_t) \le \mathrm{budget}(B), \qquad
    \text{minimising } \sum_t E_t(b_t),

where :math:`\mathrm{bytes}_t(b)` is what the compression report counts for the tensor at
:math:`b` bits (its LUTs, per-channel scales and indices packed at :math:`b` bits:
:func:`~lightning_dkm.engine.palette.stored_bytes`, the report's own accounting) and
:math:`\mathrm{budget}(B)` the same sum with every tensor at ``B`` bits. A fractional ``B``
(2.5) interpolates linearly between the budgets of :math:`\lfloor B \rfloor` and
:math:`\lceil B \rceil` bits (rounded down to whole bytes).

**The estimate** :math:`E_t(b)` of the loss increase is the second-order one of
:mod:`~lightning_dkm.model.post_training`: snapping ``w`` to its centroids costs about
:math:`\tfrac12 \sum_i h_i (w_i - c_{a(i)})^2`, with :math:`h` a diagonal curvature. What
``DKMCallback`` and the study pass is the Hessian diagonal itself (Hutchinson's estimate,
:func:`~lightning_dkm.model.post_training.hessian_diagonal`), not the squared gradients
(the Fisher information of ``palettize``'s calibration): a loss at its minimum at the
unclustered weights, as distillation toward the model itself, has squared gradients of rounding
noise but its true curvature, and ``benchmarks/budget_sensitivity.py`` finds the Hessian's
allocations never worse than uniform widths on both of the study's models, the squared
gradients' (also measured at the clustered weights) worse on one. The centroids are those
k-means finds with :math:`2^b` of them, as DKM is seeded (for scalar palettes on the values
rounded to a fine grid, :func:`_snap`). Without a sensitivity every weight counts 1 (the
squared error itself). Where the sensitivity should be had and cannot (a loss without a
double backward) or is rounding noise (:func:`_is_noise`), the widths are uniform instead
(:func:`uniform_allocation`: the budget's own width, a fractional budget's two widths around
it), with a warning: the squared error alone chose widths worse than uniform on MiniLM.

**The allocation** is a multiple-choice knapsack, solved by dynamic programming over bytes:
exact when the budget is at most 2**16 bytes; beyond that the bytes are counted in units of
``ceil(budget / 2**16)``, each tensor's rounded up (so the budget is never exceeded), the
bytes this leaves unused are then spent greedily (largest estimate decrease per byte), and
a uniform width that fits and estimates lower is taken instead (so an integer ``B`` never
estimates worse than uniform ``B``).

**Fixed widths.** A tensor whose width an ``overrides`` entry sets explicitly (``{"bits": 8}``)
keeps it; its bytes count against the budget (the budget is that of *every* clustered tensor
at ``B`` bits), and a budget the fixed tensors leave too small for the others at the
narrowest width is an error.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..engine.kmeans import kmeans, kmeans_widths, palette_unit
from ..engine.layout import MAX_BITS, PaletteLayout, is_int, is_number
from ..engine.numerics import all_finite
from ..engine.palette import LutDtype, lut_dtype_name, stored_bytes
from ..engine.parametrization import stable_seed
from ..engine.value_grid import Cells, cell_counts, cell_sums, cells_by_ops
from .targets import Target

__all__ = [
    "ALL_WIDTHS",
    "BUDGET_OF_BITS",
    "SENSITIVITY_BATCHES",
    "SENSITIVITY_SAMPLES",
    "UNIFORM",
    "BitAllocation",
    "TensorWidth",
    "allocate",
    "budget_bytes",
    "check_average_bits",
    "check_widths",
    "distortions",
    "fixed_by_overrides",
    "plan_widths",
    "uniform_allocation",
    "with_bits",
]

#: Batches whose Hessian diagonal weighs the estimate (one Rademacher probe each: a forward, a
#: backward with graph and a second backward, about 1.6 DKM training steps on the study's
#: MiniLM at its 16 samples, 0.9 at the first 8 of them). One batch, not 2: on the accuracy
#: study's MiniLM (whole encoder) at budget 3 it chose widths better than uniform ones on every
#: seed, and 2 batches' estimates agree with its (Spearman 0.999-1.000)
#: (``benchmarks/budget_estimator.py``, docs/results.md).
SENSITIVITY_BATCHES = 1
#: Samples of each sensitivity batch (``post_training.first_samples``; ``None``: whole). The
#: first 8: what keeps the allocation under #24's 5 % of the accuracy study's 32-step MiniLM fit
#: (whole encoder, process CPU, seeds 0-2, budgets 2 and 3: 4.4-4.7 % on main at ba40be5 and
#: 3.9-5.4 % in a later run at a01e439,
#: 3.4-4.1 % before #22's cheaper DKM step; 12 samples 4.8-5.3 %, the whole 16 with the old
#: plan_widths 7.3-8.8 %) and keeps its accuracy targets there (MiniLM budget 2 0.8438 +-
#: 0.0032 against uniform 0.8309 +- 0.0009, budget 3 0.9358 +- 0.0003 against 0.9351 +-
#: 0.0009; char-LM 2.3869 / 2.3162 bpc against 2.4474 / 2.3327). 6 samples lost to uniform
#: widths at budget 3 on MiniLM (one seed by 0.0016 of cosine), 4 too (by 0.006). Commands and
#: per-seed figures: docs/results.md, "The allocation under 5 %".
SENSITIVITY_SAMPLES: int | None = 8

#: What every fallback without a usable sensitivity does instead (:func:`uniform_allocation`).
UNIFORM = ("every tensor gets the budget's own width (a fractional budget, or one that is not an "
           "allowed width: the allowed width below it, and the one above it where the squared "
           "clustering error falls most per byte), not widths chosen by the squared clustering "
           "error alone, which lost to uniform widths on MiniLM")

#: Every width ``average_bits`` may choose by default.
ALL_WIDTHS = tuple(range(1, MAX_BITS + 1))
# The dynamic programme's budget in units; beyond it bytes are counted in coarser units.
_DP_UNITS = 1 << 16
# Lloyd iterations of the estimate's k-means (on at most 63,488 distinct values per palette).
_KMEANS_ITER = 50
#: The width of every tensor when neither ``bits`` nor ``average_bits`` is given.
DEFAULT_BITS = 4
#: ``average_bits="bits"``: the budget is ``bits`` itself (``DKMCallback``'s default): the widths
#: vary per tensor at the bytes of every tensor at ``bits``.
BUDGET_OF_BITS = "bits"
# Scalar palettes are clustered on their values rounded to multiples of 1 / _GRID (_snap).
_GRID = 1 << 9
# Widths above this are estimated from it, each further bit dividing the error by 4.
_MEASURED_BITS = 4
# Entries of a tensor that the passes over its weights take at once: in plan_widths on MiniLM's
# encoder (process CPU, one thread, alternating runs) 2**17 took 0.85x the time of 2**15 (fewer
# small ops; medians 0.346 / 0.373 / 0.406 s for 2**17 / 2**16 / 2**15) and 0.7x that of whole
# tensors at once.
_PIECE = 1 << 17


def check_average_bits(average_bits: object) -> float | None:
    """``average_bits`` as a float (``None`` stays ``None``): a finite number in [1, 8]."""
    if average_bits is None:
        return None
    if not is_number(average_bits) or not 1 <= average_bits <= MAX_BITS:
        raise ValueError(
            f"average_bits must be None (one width for every tensor: bits), "
            f"{BUDGET_OF_BITS!r} (a budget of bits) or a number in [1, {MAX_BITS}] (the "
            f"budget: the clustered bytes of every tensor at that many bits; 2.5 lies halfway "
            f"between 2 and 3); got {average_bits!r}")
    return float(average_bits)


def check_budget(bits: int | None, average_bits: object, allowed_bits: object,
                 default_widths: Sequence[int] = ALL_WIDTHS
                 ) -> tuple[float | None, tuple[int, ...]]:
    """``average_bits`` checked (:func:`check_average_bits`; a number never together with
    ``bits``; :data:`BUDGET_OF_BITS` is ``bits``, or :data:`DEFAULT_BITS` without it) and the
    widths it may choose (:func:`check_widths`: ``allowed_bits``, which needs
    ``average_bits``, or ``default_widths``): the one check of ``DKMCallback`` and
    ``palettize``."""
    if average_bits == BUDGET_OF_BITS:
        budget: float | None = float(DEFAULT_BITS if bits is None else bits)
    else:
        budget = check_average_bits(average_bits)
        if budget is not None and bits is not None:
            raise ValueError(
                f"bits={bits!r} and average_bits={average_bits!r} are both given; average_bits "
                "chooses every tensor's width (overrides may fix some): leave bits unset "
                f"(None), or set average_bits={BUDGET_OF_BITS!r} (a budget of bits={bits!r}) "
                "or None (every tensor at bits)")
    if budget is None and allowed_bits is not None:
        raise ValueError(f"allowed_bits={allowed_bits!r} only applies with average_bits; got "
                         "average_bits=None")
    return budget, check_widths(allowed_bits, default_widths)  # type: ignore[arg-type]


def check_widths(widths: Iterable[int] | None, default: Sequence[int] = ALL_WIDTHS
                 ) -> tuple[int, ...]:
    """The widths ``average_bits`` may choose, sorted: ``default`` for ``None``, else a
    non-empty collection of ints in 1..8."""
    if widths is None:
        return tuple(sorted(default))
    out = list(widths) if not isinstance(widths, (str, bytes)) else [widths]
    bad = [w for w in out if not is_int(w, 1) or w > MAX_BITS]
    if not out or bad:
        raise ValueError(f"allowed_bits must be a non-empty list of ints in 1..{MAX_BITS}; got "
                         f"{widths!r}")
    return tuple(sorted(set(out)))


def with_bits(layout: PaletteLayout, bits: int) -> PaletteLayout:
    """``layout`` at another width (the same shape, axes, cluster_dim, grouping, scales)."""
    return replace(layout, spec=replace(layout.spec, bits=bits))


def budget_bytes(layouts: Iterable[PaletteLayout], average_bits: float,
                 lut_dtype: LutDtype = "float16") -> int:
    """The clustered bytes of every layout at ``average_bits`` bits, as the report counts them;
    a fractional width interpolates linearly between the two integer widths around it."""
    layouts = list(layouts)
    low, high = math.floor(average_bits), math.ceil(average_bits)
    at_low = sum(stored_bytes(lay, lut_dtype, low) for lay in layouts)
    if high == low:
        return at_low
    at_high = sum(stored_bytes(lay, lut_dtype, high) for lay in layouts)
    return at_low + math.floor((average_bits - low) * (at_high - at_low))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside: the estimate's k-means is a chain of small ops on
    at most a few ten thousand points, which more threads only slow down (on a loaded
    machine by two orders of magnitude: 18 s instead of 0.07 s for k = 256 on 7k weights)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Snapped:
    """One tensor's k-means at several widths, before any sensitivity weighs the errors (the
    centroids do not depend on it), in units of ``unit``, a power of two per palette, after
    the per-channel ``scale``. Vector palettes keep ``x`` ``(P, n, d)`` (in units of ``unit``)
    and, per width, the centroid of each vector (``(P, n, d)``). Scalar palettes (``grid``:
    the cells' values, ``2 * _GRID + 1`` per palette, palette after palette) keep, per width,
    each grid cell's centroid (``centroids``: ``(C,)``), so that an estimate sums the
    sensitivity per cell instead of per weight and width (:meth:`sums`), and their ``values``
    ``(P, n)`` as they are (a view of the weight where its layout allows), which the native
    loops read, with the cells and offsets where the PyTorch ops found the grid instead."""

    layout: PaletteLayout
    scale: Tensor | None
    unit: Tensor
    centroids: dict[int, Tensor]
    x: Tensor | None = None
    grid: Tensor | None = None
    values: Tensor | None = None
    #: The PyTorch ops' cells and offsets, where :func:`_snap` found the grid by them.
    cells: Cells | None = None

    def cells_and_offsets(self) -> Cells:
        """Each scalar weight's cell (``(P, n)`` int32, palette after palette) and its offset
        from the cell's value (``(P, n)`` float32, in units of ``unit``)."""
        return self.cells if self.cells is not None else self._cells_of_values

    @functools.cached_property
    def _cells_of_values(self) -> Cells:
        """:meth:`cells_and_offsets` found from ``values`` (where the native loops counted
        the cells, keeping none), once."""
        assert self.values is not None
        cells, offsets, _, _ = _grid_values(self.values, self.unit.view(-1, 1))
        return cells, offsets

    def snapped(self, bits: int) -> Tensor:
        """``(P, n, d)``: the centroid each vector snaps to at ``bits``, in units of ``unit``."""
        if self.grid is None:
            return self.centroids[bits]
        return self.centroids[bits][self.cells_and_offsets()[0]].unsqueeze(-1)

    def weight(self, bits: int) -> Tensor:
        """The weight snapped to its palette at ``bits`` (float32, CPU; for
        ``benchmarks/budget_sensitivity.py``, which measures each snap's loss)."""
        return self.layout.from_palettes(self.snapped(bits) * self.unit, self.scale)

    def _factor(self, sensitivity: Tensor | None) -> Tensor | None:
        """The sensitivity in palette layout ``(P, n, d)`` and the scale's units (``None``: 1
        everywhere), not yet times the palettes' ``unit ** 2``: its own dtype, float64 where
        a scale multiplies it (each use converts to float64)."""
        if sensitivity is None:
            return None
        s = sensitivity.detach()
        if self.scale is not None:  # an error e in scaled units is s * e in the weight's
            s = s.double() * self.layout.broadcast_scale(self.scale.to(s.device).double()) ** 2
        return self.layout.to_palettes(s).cpu()

    def _vector_factor(self, sensitivity: Tensor | None) -> Tensor:
        """:meth:`_factor` times ``unit ** 2``, float64, for vector palettes (``unit ** 2``
        alone without a sensitivity)."""
        u = self.unit.double().square()
        f = self._factor(sensitivity)
        return u if f is None else u * f.double()

    def sums(self, sensitivity: Tensor | None) -> _CellSums:
        r"""What every estimate of a scalar tensor needs of the sensitivity ``f`` (``None``:
        1): per cell :math:`F = \sum f` and :math:`F_r = \sum f r` (``r`` a weight's
        offset from its cell's value), and :math:`\sum f r^2` over the tensor (a constant of
        every width's estimate), in float64 (they cancel to 0 where every value has a
        centroid), each times its palette's ``unit ** 2`` (a power of two: exact): the only
        pass over the weights an estimate makes, a piece of :data:`_PIECE` entries at a time
        (:func:`~lightning_dkm.engine.value_grid.cell_sums`: the native loop where it is
        built, else PyTorch ops on :meth:`cells_and_offsets`; the same sums, bit for bit)."""
        assert self.grid is not None
        P = self.unit.numel()
        f = self._factor(sensitivity)
        if f is not None:
            f = f.reshape(P, -1).contiguous()
        assert self.values is not None
        total, first, second = cell_sums(self.values, self.unit, _GRID, _piece_columns(P), f,
                                         self.cells)
        u = self.unit.double().square().reshape(-1)  # (P,)
        per_cell = u.repeat_interleave(self.grid.numel() // u.numel())
        return _CellSums(total * per_cell, first * per_cell, float(torch.dot(second, u)))

    def estimates(self, widths: Iterable[int], sensitivity: Tensor | None,
                  sums: _CellSums | None = None) -> dict[int, float]:
        """``{bits: E(bits)}`` (:func:`distortions`), measured up to 4 bits, extrapolated
        above (``sums``: :meth:`sums` of ``sensitivity``, where already had)."""
        # errors are measured in units of ``unit``: back in the weight's units. In float64:
        # the square of a float32 unit overflows above |w| ~ 2**63 and is subnormal below
        # ~ 2**-63.
        if self.grid is None:
            assert self.x is not None
            f = self._vector_factor(sensitivity)
            out = {b: 0.5 * float((f * (self.x - c).double().square()).sum())
                   for b, c in self.centroids.items()}
        else:
            out = self._per_cell(sums or self.sums(sensitivity))
        widths = sorted(widths)
        top = max(_measured(widths))
        # high-rate quantisation: each further bit quarters the squared error
        return {b: out[b] if b <= top else out[top] * 4.0 ** (top - b) for b in widths}

    def _per_cell(self, sums: _CellSums) -> dict[int, float]:
        r"""The scalar estimates summed per grid cell: with :math:`r_i = x_i - g_i` a weight's
        offset from its cell's value and :math:`\delta = g - c` the cell's from its centroid,
        :math:`\sum_i f_i (x_i - c)^2 = \sum_{cells} (F \delta^2 + 2 \delta F_r) + \sum_i
        f_i r_i^2` (:meth:`sums`): a few thousand cells per width instead of a pass over the
        weights."""
        assert self.grid is not None
        grid = self.grid.double()
        out = {}
        for bits, centroids in self.centroids.items():
            delta = grid - centroids.double()
            out[bits] = 0.5 * (float((sums.total * delta.square()
                                      + 2 * delta * sums.first).sum()) + sums.second)
        return out

    def moment(self, sensitivity: Tensor | None, sums: _CellSums | None = None) -> float:
        r""":math:`\sum_i f_i w_i^2`, the weighted squared weight (every weight snapped to
        0; :func:`_is_noise`), for scalar palettes from the cell sums (``sums``, where
        already had)."""
        if self.grid is None:
            assert self.x is not None
            return float((self._vector_factor(sensitivity) * self.x.double().square()).sum())
        assert self.grid is not None
        sums = sums or self.sums(sensitivity)
        grid = self.grid.double()
        return (float((sums.total * grid.square() + 2 * grid * sums.first).sum())
                + sums.second)


class _CellSums(NamedTuple):
    """A scalar tensor's sensitivity summed per grid cell (:meth:`_Snapped.sums`)."""

    total: Tensor  # (C,) float64
    first: Tensor  # (C,) float64
    second: float


def _measured(widths: Sequence[int]) -> list[int]:
    """The widths whose k-means the estimate runs: up to 4 bits (at least the narrowest)."""
    return [b for b in widths if b <= _MEASURED_BITS] or sorted(widths)[:1]


def _piece_columns(P: int) -> int:
    """The columns of a piece of ``P`` palettes: about :data:`_PIECE` entries, at least one
    column."""
    return max(1, _PIECE // P)


def _grid_values(x: Tensor, unit: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Palettes ``x`` ``(P, n)`` over their ``unit`` ``(P, 1)`` on the grid of multiples of
    ``1 / _GRID``, a piece of :data:`_PIECE` entries at a time: each value's cell and offset,
    and per cell the count and the sum of the values
    (:func:`~lightning_dkm.engine.value_grid.cells_by_ops`). Counting the cells instead of
    sorting the values: a tenth of the time on MiniLM's encoder, profiled (0.1 s instead of
    0.59 s for its 36 tensors). Where the native loops are built,
    :meth:`~lightning_dkm.engine.native.Kernels.grid_counts` gives the counts and sums (bit
    for bit these) in one read of ``x``, keeping no cells or offsets, and
    :meth:`~lightning_dkm.engine.native.Kernels.grid_sums` the sensitivity's sums from ``x``
    again (on MiniLM's encoder 1.6 and 2.6 ns per weight against about 7 for these ops, and
    ``plan_widths`` 0.18 s instead of 0.25 s: docs/results.md, "The grid's passes as C
    loops")."""
    return cells_by_ops(x, unit, _GRID, _piece_columns(x.shape[0]))


@torch.no_grad()
def _snap(tensors: Sequence[tuple[Tensor, PaletteLayout, Collection[int]]], seed: int
          ) -> list[_Snapped]:
    """k-means of each ``(weight, layout, widths)`` at each of its widths. Scalar palettes
    are clustered on their values rounded to multiples of ``1 / 512`` of their unit, weighted
    by their counts (at most 1,025 points whatever the tensor's size, which the exact solver
    takes on its distinct-values path; on MiniLM's encoder and the char-LM the estimates agree
    with those of a 1/2048 grid to Spearman 1.000, ``benchmarks/budget_estimator.py``; on
    MiniLM's layer 0 the 1/2048 grid's errors at 1..4 bits were within 1.1 % of exact
    k-means), all palettes of
    all tensors that need a width in one call of the exact 1-D solver (padded with weightless
    copies of a palette's last value), each centroid then the mean of its cluster's values as
    they are, not as rounded (one Lloyd update: a palette of at most ``2**b`` distinct values
    each in a grid cell of its own costs 0, as exact k-means has it); vector palettes with
    k-means++ and Lloyd, per tensor and width (seeded by
    ``stable_seed(seed, f"{name}:{bits}")``)."""
    out: list[_Snapped] = []
    size = 2 * _GRID + 1
    # (tensor, palette, its occupied cells' positions, values, counts and sums)
    scalars: list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]] = []
    with _one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few distinct values: error 0
        for i, (weight, layout, widths) in enumerate(tensors):
            scale = layout.channel_scale(weight)
            x = layout.to_palettes(weight.detach(), scale).float().cpu()  # (P, n, d)
            if not all_finite(x):
                raise ValueError(f"{layout.name}: the weight has NaN or Inf values, whose "
                                 "clustering error average_bits cannot estimate")
            unit = palette_unit(x)
            if x.shape[-1] > 1:
                x = x / unit
                out.append(_Snapped(layout, scale, unit, {}, x=x))
                for bits in widths:
                    generator = torch.Generator().manual_seed(
                        stable_seed(seed, f"{layout.name}:{bits}"))
                    result = kmeans(x, 1 << bits, generator, max_iter=_KMEANS_ITER)
                    idx = result.labels.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                    out[i].centroids[bits] = result.centroids.gather(1, idx)
                continue
            palettes = x[..., 0].contiguous()
            counts, sums, cells = cell_counts(palettes, unit, _GRID, _piece_columns(x.shape[0]))
            grid = ((torch.arange(x.shape[0] * size) % size - _GRID).float() / _GRID)
            out.append(_Snapped(layout, scale, unit, {}, grid=grid, values=palettes,
                                cells=cells))
            for p in range(x.shape[0]):
                mine = slice(p * size, (p + 1) * size)
                present = counts[mine].nonzero().squeeze(1)
                scalars.append((i, p, present, grid[mine][present],
                                counts[mine][present].float(), sums[mine][present]))
        per_cell: dict[tuple[int, int], list[Tensor]] = {}  # (tensor, bits): per palette
        # the palettes that need the same widths: one program for all of them (kmeans_widths)
        for needed in sorted({tuple(sorted(tensors[s[0]][2])) for s in scalars}):
            rows = [s for s in scalars if tuple(sorted(tensors[s[0]][2])) == needed]
            # at least k points per palette: weightless copies of its last value where it has
            # fewer (they join that value's bin: the program is that of its values alone)
            m = max(max(s[3].numel() for s in rows), 1 << max(needed))
            values = torch.stack([torch.cat([d, d[-1:].expand(m - d.numel())])
                                  for _, _, _, d, _, _ in rows])
            counts = torch.stack([torch.cat([c, c.new_zeros(m - c.numel())])
                                  for _, _, _, _, c, _ in rows])
            sums = torch.stack([torch.cat([t, t.new_zeros(m - t.numel())])
                                for _, _, _, _, _, t in rows])
            results = kmeans_widths(values.unsqueeze(-1), [1 << b for b in needed],
                                    sample_weight=counts)
            for bits, result in zip(needed, results, strict=True):
                # each centroid the mean of its members' values as they are (a Lloyd update)
                members = torch.zeros(len(rows), 1 << bits, dtype=torch.float64)
                members.scatter_add_(1, result.labels, counts.double())
                total = torch.zeros_like(members).scatter_add_(1, result.labels, sums)
                centroids = torch.where(members > 0, total / members.clamp_min(1),
                                        result.centroids[..., 0].double()).float()
                snapped = centroids.gather(1, result.labels)  # (rows, m)
                for r, (i, _, present, _, _, _) in enumerate(rows):
                    cell = torch.zeros(size)  # an empty cell's centroid weighs nothing
                    cell[present] = snapped[r, : present.numel()]
                    per_cell.setdefault((i, bits), []).append(cell)
    for i in sorted({s[0] for s in scalars}):
        out[i] = replace(out[i], centroids={bits: torch.cat(per_cell[(i, bits)])
                                            for bits in tensors[i][2]})
    return out


def distortions(
    weight: Tensor,
    layout: PaletteLayout,
    widths: Iterable[int],
    sensitivity: Tensor | None = None,
    *,
    seed: int = 0,
) -> dict[int, float]:
    r"""The estimated loss increase :math:`E(b) = \tfrac12 \sum_i h_i (w_i - c_{a(i)})^2` of
    clustering ``weight`` with ``layout`` at each width ``b`` of ``widths`` (module docstring).

    Args:
        weight: the tensor as it is when clustering starts.
        layout: its layout (its spec's ``bits`` is ignored; ``per_channel_scale`` applies).
        widths: the widths to estimate; each must leave every palette at least ``2**b``
            vectors.
        sensitivity: :math:`h_i`, the weight's shape (e.g. the Hessian diagonal);
            ``None``: 1 for every weight.
        seed: k-means++ seed of vector palettes (per width ``stable_seed(seed, f"{name}:{b}")``).

    Returns:
        ``{bits: estimate}``, floats >= 0 (0 where a palette has no more distinct values than
        centroids). Widths above 4 are not clustered: each further bit divides the 4-bit
        estimate by 4 (high-rate quantisation theory, :math:`D \propto 2^{-2b}`; measured on
        a Gaussian 1536 x 384 weight the ratios from 4 to 8 bits are 3.8-4.0), since k-means
        at 128 and 256 centroids is most of the cost (exact 1-D k-means: 2.8 s of 4.8 s at 8
        bits for that weight).

    Raises:
        ValueError: ``weight`` has NaN or Inf values.
    """
    widths = sorted(widths)
    snapped, = _snap([(weight, layout, _measured(widths))], seed)
    return snapped.estimates(widths, sensitivity)


def allocate(options: Mapping[str, Mapping[int, tuple[int, float]]], budget: int
             ) -> dict[str, int]:
    """The widths that minimise the summed estimate with the summed bytes at most ``budget``.

    Args:
        options: ``{tensor: {bits: (bytes, estimate)}}``, at least one width per tensor.
        budget: bytes (an int >= 0).

    Returns:
        ``{tensor: bits}``: exact for budgets up to 2**16 bytes, beyond that as the module
        docstring's allocation paragraph says.

    Raises:
        ValueError: an empty option set, or a budget below the cheapest choice.
    """
    names = list(options)
    if not names:
        return {}
    for name in names:
        if not options[name]:
            raise ValueError(f"{name}: no width to choose from")
    cheapest = sum(min(b for b, _ in options[n].values()) for n in names)
    if cheapest > budget:
        raise ValueError(f"the budget of {budget:,} bytes is below the {cheapest:,} bytes of the "
                         "narrowest widths")
    unit = max(1, -(-budget // _DP_UNITS))
    capacity = budget // unit
    best = np.zeros(capacity + 1)  # best[c]: the least estimate within c units
    choices: list[tuple[list[int], np.ndarray]] = []
    value = np.empty(capacity + 1)
    better = np.empty(capacity + 1, dtype=bool)
    for name in names:
        widths = sorted(options[name], key=lambda b: (options[name][b][0], -b))
        # the least over the widths, the first width where several tie: row by row with a
        # strict comparison, in place (argmin over a (widths, capacity) table: 10x the time)
        least = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int8 if len(widths) < 128 else np.intp)
        for row, bits in enumerate(widths):
            cost = -(-options[name][bits][0] // unit)
            if cost <= capacity:
                size = capacity + 1 - cost
                np.add(best[:size], options[name][bits][1], out=value[:size])
                np.less(value[:size], least[cost:], out=better[:size])
                np.copyto(least[cost:], value[:size], where=better[:size])
                np.copyto(pick[cost:], row, where=better[:size])
        best = least
        choices.append((widths, pick))
    chosen: dict[str, int] = {}
    c = capacity
    if not np.isfinite(best[c]):  # only when rounding up costs left no room: the narrowest
        chosen = {n: min(options[n], key=lambda b: options[n][b][0]) for n in names}
    else:
        for name, (widths, pick) in zip(reversed(names), reversed(choices), strict=True):
            bits = widths[pick[c]]
            chosen[name] = bits
            c -= -(-options[name][bits][0] // unit)
    chosen = _fill(options, {n: chosen[n] for n in names}, budget)
    return _uniform_if_better(options, chosen, budget)


def _total(options: Mapping[str, Mapping[int, tuple[int, float]]], chosen: Mapping[str, int],
           which: int) -> float:
    return sum(options[n][b][which] for n, b in chosen.items())


def _fill(options: Mapping[str, Mapping[int, tuple[int, float]]], chosen: dict[str, int],
          budget: int) -> dict[str, int]:
    """Spend the bytes left under ``budget`` greedily: the change of one tensor's width that
    lowers the estimate most per byte, while one fits."""
    left = budget - int(_total(options, chosen, 0))
    while True:
        best: tuple[float, str, int] | None = None
        for name, bits in chosen.items():
            size, estimate = options[name][bits]
            for other, (other_size, other_estimate) in options[name].items():
                extra, gain = other_size - size, estimate - other_estimate
                if gain <= 0 or extra > left:
                    continue
                rate = math.inf if extra <= 0 else gain / extra
                if best is None or rate > best[0]:
                    best = (rate, name, other)
        if best is None:
            return chosen
        _, name, bits = best
        left -= options[name][bits][0] - options[name][chosen[name]][0]
        chosen[name] = bits


def _uniform_if_better(options: Mapping[str, Mapping[int, tuple[int, float]]],
                       chosen: dict[str, int], budget: int) -> dict[str, int]:
    common = set.intersection(*(set(o) for o in options.values()))
    for bits in sorted(common):
        uniform = {n: bits for n in chosen}
        if (_total(options, uniform, 0) <= budget
                and _total(options, uniform, 1) < _total(options, chosen, 1)):
            chosen = uniform
    return chosen


@dataclass(frozen=True)
class TensorWidth:
    """One tensor's width and why: the estimate at every width considered."""

    name: str
    bits: int
    bytes: int
    #: ``{bits: estimated loss increase}`` (empty for a fixed tensor).
    estimates: dict[int, float] = field(default_factory=dict)
    #: Set by an ``overrides`` entry's ``bits``, not chosen.
    fixed: bool = False

    @property
    def estimate(self) -> float | None:
        """The estimate of the chosen width (``None`` for a fixed tensor)."""
        return self.estimates.get(self.bits)


@dataclass(frozen=True)
class BitAllocation:
    """The widths :func:`plan_widths` chose, with the budget and the estimates behind them."""

    average_bits: float
    budget_bytes: int
    allowed_bits: tuple[int, ...]
    lut_dtype: str
    #: What weighted the errors: ``"hessian (1 batch, the first 8 samples of each)"`` (the
    #: callback's training batches, ``palettize``'s calibration ones), ``"given"`` (a
    #: sensitivity passed to :func:`plan_widths`), ``"none"`` (squared error), or
    #: ``"uniform (<why>)"`` / ``"uniform (<label> was rounding noise)"``
    #: (:func:`uniform_allocation`).
    sensitivity: str
    tensors: tuple[TensorWidth, ...]
    #: The ``overrides`` (pattern -> settings) the widths were chosen under, as primitives:
    #: ``DKMCallback`` records them so that a resume can tell whether they changed; ``None``
    #: where none were recorded (``palettize``, or an allocation saved before they were).
    overrides: dict[str, dict[str, Any]] | None = None

    @property
    def bits(self) -> dict[str, int]:
        """``{tensor name: bits}``."""
        return {t.name: t.bits for t in self.tensors}

    @property
    def total_bytes(self) -> int:
        """The clustered bytes at the chosen widths (<= :attr:`budget_bytes`)."""
        return sum(t.bytes for t in self.tensors)

    def apply(self, targets: Sequence[Target]) -> list[Target]:
        """``targets`` with the chosen widths (a target not in the allocation is an error)."""
        bits = self.bits
        missing = [t.name for t in targets if t.name not in bits]
        if missing:
            raise ValueError(f"the bit allocation has no width for {missing}; it covers "
                             f"{sorted(bits)}")
        return [replace(t, layout=with_bits(t.layout, bits[t.name])) for t in targets]

    def to_dict(self) -> dict[str, Any]:
        """Primitives (checkpoints, the report's JSON); :meth:`from_dict` reads it back."""
        return {
            "average_bits": self.average_bits,
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "allowed_bits": list(self.allowed_bits),
            "lut_dtype": self.lut_dtype,
            "sensitivity": self.sensitivity,
            "tensors": [
                {"name": t.name, "bits": t.bits, "bytes": t.bytes, "fixed": t.fixed,
                 "estimate": t.estimate,
                 "estimates": {str(b): e for b, e in sorted(t.estimates.items())}}
                for t in self.tensors
            ],
            "overrides": (None if self.overrides is None
                          else {p: dict(o) for p, o in self.overrides.items()}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitAllocation:
        try:
            return cls(
                average_bits=float(data["average_bits"]),
                budget_bytes=int(data["budget_bytes"]),
                allowed_bits=tuple(int(b) for b in data["allowed_bits"]),
                lut_dtype=str(data["lut_dtype"]),
                sensitivity=str(data["sensitivity"]),
                tensors=tuple(
                    TensorWidth(name=str(t["name"]), bits=int(t["bits"]), bytes=int(t["bytes"]),
                                estimates={int(b): float(e) for b, e in t["estimates"].items()},
                                fixed=bool(t["fixed"]))
                    for t in data["tensors"]),
                overrides=(None if data.get("overrides") is None  # not recorded before
                           else {str(p): dict(o) for p, o in data["overrides"].items()}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a bit allocation: {err!r}") from err

    def to_markdown(self) -> str:
        """One row per tensor: width, bytes, the estimate that chose it (and the others)."""
        lines = [
            f"average_bits={self.average_bits:g}: {self.total_bytes:,} of {self.budget_bytes:,} "
            f"budget bytes (LUTs at {self.lut_dtype}); widths from {list(self.allowed_bits)}; "
            f"sensitivity: {self.sensitivity}",
            "",
            "| tensor | bits | bytes | estimate | estimate per width |",
            "| :--- | ---: | ---: | ---: | :--- |",
        ]
        for t in self.tensors:
            per_width = ("fixed by overrides" if t.fixed else
                         ", ".join(f"{b}: {e:.3g}" for b, e in sorted(t.estimates.items())))
            estimate = "-" if t.estimate is None else f"{t.estimate:.3g}"
            lines.append(f"| {t.name} | {t.bits} | {t.bytes:,} | {estimate} | {per_width} |")
        return "\n".join(lines) + "\n"


def fixed_by_overrides(targets: Iterable[Target],
                       overrides: Mapping[str, Mapping[str, Any]] | None) -> set[str]:
    """The targets whose width an ``overrides`` entry sets explicitly (``"bits"`` in it)."""
    overrides = overrides or {}
    return {t.name for t in targets
            if t.override is not None and "bits" in overrides.get(t.override, {})}


def plan_widths(
    targets: Sequence[Target],
    weights: Mapping[str, Tensor],
    average_bits: float,
    *,
    fixed: Collection[str] = (),
    sensitivity: Mapping[str, Tensor] | None = None,
    sensitivity_label: str | None = None,
    allowed_bits: Iterable[int] | None = None,
    lut_dtype: LutDtype = "float16",
    seed: int = 0,
    budget: int | None = None,
) -> BitAllocation:
    """Choose every target's width under the budget of ``average_bits`` (module docstring).

    Args:
        targets: the tensors to cluster (:func:`~lightning_dkm.model.targets.select_targets`),
            each with its layout (overrides applied; ``bits`` is replaced unless ``fixed``).
        weights: ``{name: tensor}`` as clustering starts, for every target.
        average_bits: the budget, a number in [1, 8].
        fixed: names whose layout's width is kept (:func:`fixed_by_overrides`); their bytes
            count against the budget.
        sensitivity: ``{name: F}`` of each weight's shape (e.g.
            :func:`~lightning_dkm.model.post_training.hessian_diagonal`); ``None``: 1
            everywhere. One that is rounding noise (:func:`_is_noise`) gives the widths of
            :func:`uniform_allocation` instead, with a warning naming ``average_bits``.
        sensitivity_label: how the allocation records it (default ``"given"`` / ``"none"``).
        allowed_bits: the widths to choose from (default 1..8), e.g. Core AI's (1, 2, 4, 6, 8).
        lut_dtype: the LUTs' storage dtype, as the report counts them.
        seed: the estimate's k-means seed.
        budget: the clustered bytes not to exceed; default ``None``: those of every target at
            ``average_bits`` (:func:`budget_bytes`). ``DKMCallback``'s default budget is the
            targets' bytes at their configured widths (``bits``, and an override's own).

    Raises:
        ValueError: ``average_bits`` or ``allowed_bits`` out of range, a missing weight, a
            tensor no allowed width fits, a budget the fixed tensors leave too small, or a
            weight or sensitivity with NaN or Inf values.
    """
    return _plan(targets, weights, average_bits, fixed, sensitivity, sensitivity_label,
                 allowed_bits, lut_dtype, seed, budget, uniform=False)


def _plan(targets: Sequence[Target], weights: Mapping[str, Tensor], average_bits: float,
          fixed: Collection[str], sensitivity: Mapping[str, Tensor] | None,
          sensitivity_label: str | None, allowed_bits: Iterable[int] | None,
          lut_dtype: LutDtype, seed: int, budget: int | None, *, uniform: bool
          ) -> BitAllocation:
    """:func:`plan_widths` (``uniform``: :func:`uniform_allocation`'s widths around the
    budget, chosen between by the squared error alone)."""
    average_bits = check_average_bits(average_bits)
    assert average_bits is not None
    allowed = check_widths(allowed_bits)
    lut_name = lut_dtype_name(lut_dtype)
    missing = [t.name for t in targets if t.name not in weights]
    if missing:
        raise ValueError(f"plan_widths: no weight given for {missing}")
    if budget is None:
        budget = budget_bytes([t.layout for t in targets], average_bits, lut_dtype)
    fixed_rows = [TensorWidth(t.name, t.spec.bits, stored_bytes(t.layout, lut_dtype), fixed=True)
                  for t in targets if t.name in fixed]
    free = [t for t in targets if t.name not in fixed]
    widths: dict[str, list[int]] = {}
    for target in free:
        # a layout needs at least 2**bits vectors in each palette
        widths[target.name] = [b for b in allowed if target.layout.vectors_per_palette >= 1 << b]
        if not widths[target.name]:
            raise ValueError(
                f"{target.name}: no width of allowed_bits={list(allowed)} fits its palettes of "
                f"{target.layout.vectors_per_palette} vectors; allow narrower widths or leave "
                "it out (exclude / min_size)")
    sizes = {t.name: {b: stored_bytes(t.layout, lut_dtype, b) for b in widths[t.name]}
             for t in free}
    left = budget - sum(r.bytes for r in fixed_rows)
    need = sum(min(size.values()) for size in sizes.values())
    if need > left:  # bytes alone decide it: before any k-means
        raise ValueError(
            f"average_bits={average_bits:g} gives a budget of {budget:,} bytes; the "
            f"{len(fixed_rows)} tensor(s) whose bits overrides fix take "
            f"{budget - left:,} of them and the other {len(free)} need at least {need:,} at "
            f"their narrowest allowed width ({min(allowed)} bits). Raise average_bits, lower "
            "the overrides' bits, or allow narrower widths")
    label = sensitivity_label or ("given" if sensitivity is not None else "none")
    if sensitivity is not None:
        bad = [t.name for t in free if (h := sensitivity.get(t.name)) is not None
               and not all_finite(h)]
        if bad:  # NaN passed for rounding noise, Inf made every estimate NaN
            raise ValueError(f"plan_widths: the sensitivity of {bad} has NaN or Inf values")
    snapped = dict(zip((t.name for t in free), _snap(
        [(weights[t.name], t.layout, _measured(widths[t.name])) for t in free], seed),
        strict=True))
    # the sensitivity summed per grid cell once per tensor: for the noise test and estimates
    sums = {} if sensitivity is None else {
        n: s.sums(sensitivity.get(n)) for n, s in snapped.items() if s.grid is not None}
    # with every tensor fixed there is no sensitivity to judge (nor any width to choose)
    if sensitivity is not None and free and _is_noise(sensitivity, weights, {
            n: snapped[n].moment(sensitivity[n], sums.get(n))
            for n in snapped if n in sensitivity}):
        warnings.warn(
            f"average_bits={average_bits:g}: the sensitivity ({label}) is rounding noise (it "
            f"accounts for loss changes below float32's resolution), so {UNIFORM}",
            UserWarning, stacklevel=3)
        sensitivity, label, uniform = None, f"uniform ({label} was rounding noise)", True
        sums = {}
    options: dict[str, dict[int, tuple[int, float]]] = {}
    estimates: dict[str, dict[int, float]] = {}
    for target in free:
        estimates[target.name] = snapped[target.name].estimates(
            widths[target.name], None if sensitivity is None else sensitivity.get(target.name),
            sums.get(target.name))
        options[target.name] = {b: (sizes[target.name][b], estimates[target.name][b])
                                for b in widths[target.name]}
    if uniform:  # keeps a narrowest width whenever only it fits: ``need`` still holds
        options = _around(options, average_bits, left)
    chosen = allocate(options, left)
    rows = {r.name: r for r in fixed_rows}
    for target in free:
        bits = chosen[target.name]
        rows[target.name] = TensorWidth(target.name, bits, options[target.name][bits][0],
                                        estimates[target.name])
    return BitAllocation(average_bits, budget, allowed, lut_name, label,
                         tuple(rows[t.name] for t in targets))


def _around(options: Mapping[str, Mapping[int, tuple[int, float]]], average_bits: float,
            budget: int) -> dict[str, dict[int, tuple[int, float]]]:
    """Each tensor's options cut to the widths around ``average_bits``: the widest at most it
    and the narrowest at least it (one width, ``B`` itself, for an integer ``B`` it may take),
    so that no tensor goes below the budget's width to pay for another; the widest a tensor
    takes where it takes none of those (palettes too small). If the fixed tensors leave
    ``budget`` too small for that, the narrower widths too (the squared error chooses)."""
    out = {}
    for name, option in options.items():
        low = [b for b in option if b <= average_bits]
        high = [b for b in option if b >= average_bits]
        keep = ({max(low)} if low else set()) | ({min(high)} if high else set())
        out[name] = {b: option[b] for b in (keep or {max(option)})}
    if sum(min(size for size, _ in o.values()) for o in out.values()) > budget:
        top = {n: max(o) for n, o in out.items()}
        out = {n: {b: v for b, v in options[n].items() if b <= top[n]} for n in options}
    return out


def uniform_allocation(
    targets: Sequence[Target],
    weights: Mapping[str, Tensor],
    average_bits: float,
    why: str,
    *,
    fixed: Collection[str] = (),
    allowed_bits: Iterable[int] | None = None,
    lut_dtype: LutDtype = "float16",
    seed: int = 0,
    budget: int | None = None,
) -> BitAllocation:
    """The widths ``average_bits`` takes without a usable sensitivity (:data:`UNIFORM`):
    every tensor at the budget's width; a fractional budget (2.5) gives every tensor the
    allowed width just below it and spends the bytes up to the budget on the width just above
    it where the squared clustering error falls most per byte, so that no tensor is narrower
    than uniform ``floor(B)`` bits (with Core AI's widths 1, 2, 4, 6, 8 and ``B = 3``: 2 and 4).
    ``why`` is recorded as the allocation's ``sensitivity``, ``"uniform (<why>)"``; the
    caller warns. Arguments and errors as :func:`plan_widths`."""
    allocation = _plan(targets, weights, average_bits, fixed, None, None, allowed_bits,
                       lut_dtype, seed, budget, uniform=True)
    return replace(allocation, sensitivity=f"uniform ({why})")


def _is_noise(sensitivity: Mapping[str, Tensor], weights: Mapping[str, Tensor],
              moments: Mapping[str, float] | None = None) -> bool:
    r"""Whether ``sensitivity`` (a Hessian diagonal or squared gradients) is rounding noise:
    the loss change
    it accounts for when every weight moves by its own size,
    :math:`\sqrt{\sum_i F_{ii} w_i^2}`, is below float32's resolution of a unit loss
    (``eps`` = 1.2e-7). Measured at the unclustered weights of a loss at its minimum
    (distillation toward the model itself) it is about 1e-9; where gradients exist, orders of
    magnitude above. (A loss whose natural scale is far below 1 reads as noise too.)
    ``moments``: each named tensor's :math:`\sum_i F_{ii} w_i^2` where already had
    (:meth:`_Snapped.moment`, from its grid cells: the same sum to float64 rounding)."""
    moments = moments or {}
    total = sum(moments[n] if n in moments else
                float((f.double() * weights[n].detach().double().square().to(f.device)).sum())
                for n, f in sensitivity.items() if n in weights)
    return not math.sqrt(max(total, 0.0)) > torch.finfo(torch.float32).eps
