r"""DKM on the distinct half-precision values of a tensor (the eDKM idea, arXiv 2309.00964).

For scalar clustering (``cluster_dim = 1``) the attention of a weight depends only on its
value. Rounded to float16 *after normalisation* (centred and scaled by a power of two, so that
a deviation of at least one standard deviation keeps float16's relative precision of
:math:`2^{-11}` and a smaller one is rounded on an even grid of :math:`2^{-10}` standard
deviations, :data:`~.float16_codes.FLOOR_SHIFT`), a palette has at most 65,536 distinct values,
about 4 x 10^3 for half a million Gaussian weights. This step runs every DKM iteration on the
distinct values ``u`` with their counts :math:`w_u`, forward and backward; cost per step
``O(n + U k max_iter)`` instead of ``O(n k max_iter)``.

**What touches every weight, and why it is so little.** On CPU an O(n) pass costs mostly the
fresh memory it writes (page faults), so the step writes little: it works in chunks of ``CHUNK``
weights whose temporaries the allocator reuses, converts the codes to table columns once per
forward, and writes each look-up into its result (the backward's second table is gathered a
``PIECE`` at a time into one reused scratch buffer). Off the CPU chunks and pieces are larger
(:func:`~.float16_codes.pass_sizes`): there each costs kernel launches. The forward rounds
``(x - mean) / 2^(e + 14)`` to float16 (``2^e`` is the power of two nearest the palette's standard
deviation, so the scaling is exact; :mod:`.float16_codes` says why 14); each bit pattern is a
column of a dense table of 65,536 entries per palette. It counts the columns (``bincount``) and
reads each output from a table of the clustered values per code, already in the weights' units
(one ``index_select``). The standard deviation that sets tau's units comes from the counted
values, not from another pass over the weights. On the CPU these passes are C loops
(:mod:`.native`: encoding and counting in one read, each look-up and the backward's sums one
loop each), bit for bit the values of the PyTorch ops described here, which run wherever the
loops cannot. The backward sums the incoming gradient per code (a weighted ``bincount``) and
forms each weight's gradient :math:`a_u + b_u g_i` from two table lookups. Normalising and
denormalising happen on the distinct values: the normalisation constants cancel in the gradient.
Autograd saves the float16 codes (2 bytes per weight) and ``O(U k max_iter)`` for the values.

**What is approximated, and how much.** The attention and the weights in the centroid sums are
those of the float16-rounded value of each (centred, power-of-two-scaled) weight; the gradient
passes straight through the rounding. The result is *exactly* DKM of the rounded weights (the
tests compare with the reference step on inputs the codes hold exactly to 1e-5). On arbitrary
weights the values differ by the rounding (``|dx| <= 2^{-11} max(|x - mean|, 2^e)``: at most
~7e-4 of the standard deviation for weights within 1 std of the mean, ``2^{-11}`` of their
distance from it beyond) times the attention's sensitivity, which is large only for weights on
a cluster boundary; ``docs/benchmarks.md`` gives the measured difference.

**Without host reads** (:func:`~.numerics.host_reads_are_free`: on an accelerator, under
``torch.compile``, in :func:`~.numerics.sync_free`) the padded layout cannot be sized by the
widest palette's count of distinct values (``nonzero`` and that count would be read back), so
it takes ``min(n, 65536)`` columns, a bound from the shape, and each occupied code goes to the
column of its rank (a cumulative sum); the columns past a palette's last distinct value hold
value 0 and count 0, so they add nothing to any sum. Counting uses ``index_add_`` into the
fixed-size table (``bincount`` reads its input's maximum back), the rough standard deviation
picks its fallback with ``torch.where``, and the early stop is decided on the device
(:class:`~.numerics.EarlyStop`). The values are those of the compact layout up to the
summation order; the iterations do up to ``min(n, 65536) / U`` times the work (about 3x for
half a million Gaussian weights), which an accelerator does in microseconds.

**A batch shares one layout** (:func:`~.float16_codes.prepare_shared`): the units, the distinct
values, the scales and the per-code tables of the soft weights and gradients are computed
once for all its tensors, not once per tensor. On an accelerator every operator is a kernel
launch (``benchmarks/count_ops.py``); on the CPU each costs a few microseconds of dispatch,
and the compact layout of a batch of palettes is what padding each tensor's to the widest
gave. A batch in which a normalisation is given keeps one layout per tensor
(:func:`~.float16_codes.prepare`).

**The DKM itself** is the weighted core's (:mod:`.weighted`), fed the distinct values and
their counts: its forward, and its backward for the gradient summed per value, which gives
every weight ``i`` of value ``u`` the gradient :math:`s_u + b_u g_i` (exact for the rounded
problem; the derivation is the core's, written once).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import native
from .float16_codes import (
    CODES,
    CodeColumns,
    DistinctValues,
    prepare,
    prepare_shared,
)
from .numerics import (
    DKMOutput,
    Groups,
    Normalization,
    autocast_disabled,
    check_step_arguments,
    host_reads_are_free,
    inverse_temperature,
    normalization_of,
    palette_inverse_temperatures,
)
from .rebuild import CodesOnce, rebuilt_soft_weights
from .weighted import (
    Gradient,
    check_gradient,
    load_trajectory,
    save_trajectory,
    weighted_dkm,
    weighted_dkm_gradient,
)

__all__ = ["unique_dkm_batch", "unique_dkm_cluster"]


class _Config(NamedTuple):
    """What :class:`_UniqueDKM` needs besides its tensors, one entry per tensor where a tuple."""

    normalizations: tuple[Normalization | None, ...]
    #: 1 / tau (:func:`~.numerics.inverse_temperature`): the one tensor's, or per palette of
    #: the batch (P, 1, 1) (:func:`~.numerics.palette_inverse_temperatures`)
    inv_tau: Tensor | float
    palettes: tuple[int, ...]  # per tensor
    max_iter: int
    epsilon: float
    implicit: bool  # the implicit gradient
    device_side: bool  # no host reads (:func:`~.numerics.host_reads_are_free`)
    codes_once: tuple[CodesOnce | None, ...]  # a rebuilding tensor's codes (:mod:`.rebuild`)
    exact: int = 0  # the last ``exact`` tensors are clustered on their exact weights


class _OwnLayouts:
    """Each tensor of a batch with a distinct-value layout of its own (:func:`prepare`): its
    palettes are rows ``rows[t]`` of the batch and its values the first ``widths[t]`` columns,
    normalised by ``centers[t]`` and ``scales[t]`` (P_t, 1). The layouts keep no values (the
    batch's are saved with the trajectory)."""

    shares_tables = False  # each per-code table is a tensor of its own

    def __init__(self, distinct: Sequence[DistinctValues], rows: list[slice],
                 centers: Sequence[Tensor], scales: Sequence[Tensor]) -> None:
        self.parts = [d._replace(values=None) for d in distinct]
        self.rows, self.centers, self.scales = rows, centers, scales
        self.widths = [d.counts.shape[1] for d in distinct]

    def soft_tables(self, y: Tensor) -> list[Tensor]:
        """Each tensor's per-code table (P_t * 65536,) of the batch's values ``y`` (P, U),
        in its weights' units."""
        return [d.to_dense(y[r, :w] * scale + center) for d, r, w, center, scale in zip(
            self.parts, self.rows, self.widths, self.centers, self.scales, strict=True)]

    def to_dense(self, compact: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        """Each wanted tensor's per-code table of ``compact`` (P, U)."""
        return [d.to_dense(compact[r, :w]) if want else None
                for d, r, w, want in zip(self.parts, self.rows, self.widths, wanted, strict=True)]

    def sums_per_value(self, columns: Sequence[CodeColumns], grads: Sequence[Tensor | None],
                       like: Tensor) -> Tensor:
        """The batch's (P, U) sums of each tensor's ``grads`` (P_t, n_t) over the weights of
        each distinct value (0 in padding and for a tensor without one)."""
        return self.from_dense(_sums_per_code(columns, grads), like)

    def from_dense(self, per_code: Sequence[Tensor | None], like: Tensor) -> Tensor:
        """The batch's (P, U) values (0 in padding and for a tensor without one) of each
        tensor's per-code table."""
        out = torch.zeros_like(like)
        for d, r, w, table in zip(self.parts, self.rows, self.widths, per_code, strict=True):
            if table is not None:
                out[r, :w] = d.from_dense(table)
        return out


class _SharedLayout:
    """Every palette of a batch in one distinct-value layout (:func:`prepare_shared`),
    normalised by ``center`` and ``scale`` (P, 1): the per-code tables of all tensors are one
    table, tensor ``t`` its rows ``rows[t]``; the methods are :class:`_OwnLayouts`'."""

    shares_tables = True  # each per-code table is a view of the batch's

    def __init__(self, distinct: DistinctValues, rows: list[slice], center: Tensor,
                 scale: Tensor) -> None:
        self.distinct = distinct._replace(values=None)
        self.rows, self.center, self.scale = rows, center, scale

    def _split(self, dense: Tensor) -> list[Tensor]:
        return [dense[r.start * CODES: r.stop * CODES] for r in self.rows]

    def soft_tables(self, y: Tensor) -> list[Tensor]:
        return self._split(self.distinct.to_dense(y * self.scale + self.center))

    def to_dense(self, compact: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        tables = self._split(self.distinct.to_dense(compact))
        return [table if want else None for table, want in zip(tables, wanted, strict=True)]

    def sums_per_value(self, columns: Sequence[CodeColumns], grads: Sequence[Tensor | None],
                       like: Tensor) -> Tensor:
        out = torch.zeros_like(like)
        if self.sums_into(columns, grads, out):
            return out
        return self.from_dense(_sums_per_code(columns, grads), like)

    def sums_into(self, columns: Sequence[CodeColumns], grads: Sequence[Tensor | None],
                  out: Tensor) -> bool:
        """:meth:`sums_per_value` written into ``out`` (zeros, at least the batch's rows and
        columns) by :mod:`.native`'s :meth:`~.native.Kernels.sums_at`, which zeroes, adds
        into and reads only the entries of each palette's distinct codes in a scratch table,
        where the loops take every tensor and the distinct values know their number per
        palette (:func:`~.float16_codes.prepare_shared`'s marked codes); ``False`` (``out``
        then holds nothing to read) elsewhere."""
        d = self.distinct
        present = [g for g in grads if g is not None]
        if d.occupied is None or d.rows is None or not present:
            return False
        loops = native.loops_for(out, *present)
        if loops is None:
            return False
        starts = [0, *itertools.accumulate(d.occupied)]
        scratch = out.new_empty(max(r.stop - r.start for r in self.rows) * CODES)
        for r, column, g in zip(self.rows, columns, grads, strict=True):
            if g is not None and loops.sums_at(
                    column.codes, g, scratch, d.ids, d.rows, d.cols,
                    slice(starts[r.start], starts[r.stop]), r.start, out) is None:
                return False
        return True

    def from_dense(self, per_code: Sequence[Tensor | None], like: Tensor) -> Tensor:
        parts = [like.new_zeros((r.stop - r.start) * CODES) if table is None else table
                 for r, table in zip(self.rows, per_code, strict=True)]
        return self.distinct.from_dense(parts[0] if len(parts) == 1 else torch.cat(parts))


class _ExactPoints:
    """A tensor of a batch clustered on its exact weights (``unique_dkm_batch``'s ``exact``):
    each weight is a point of its own with count 1, so its "per-code" table is its row of the
    batch and a look-up is the identity: the methods of :class:`~.float16_codes.CodeColumns`
    that the step calls."""

    @staticmethod
    def sum_per_code(weights: Tensor) -> Tensor:
        return weights

    @staticmethod
    def look_up(table: Tensor, factor: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if factor is None:
            return table
        b, g = factor
        return torch.addcmul(table, b, g)


class _WithExactRows:
    """A batch's coded tensors in their shared layout (``coded``, rows ``[0, P_c)``) followed by
    tensors on their exact weights, tensor ``t`` at rows ``rows[t]`` with ``widths[t]`` points,
    normalised by ``centers[t]`` and ``scales[t]`` (:func:`~.numerics.normalization_of`, as
    :mod:`.chunked` normalises): the methods are :class:`_OwnLayouts`', an exact tensor's table
    being its (P_t, n_t) row block."""

    shares_tables = True

    def __init__(self, coded: _SharedLayout, rows: list[slice], widths: list[int],
                 centers: list[Tensor], scales: list[Tensor]) -> None:
        self.coded, self.rows, self.widths = coded, rows, widths
        self.centers, self.scales = centers, scales
        self.coded_rows = coded.rows[-1].stop

    def soft_tables(self, y: Tensor) -> list[Tensor]:
        return self.coded.soft_tables(y[: self.coded_rows]) + [
            y[r, :w] * scale + center for r, w, center, scale in zip(
                self.rows, self.widths, self.centers, self.scales, strict=True)]

    def to_dense(self, compact: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        coded = len(self.coded.rows)
        return self.coded.to_dense(compact[: self.coded_rows], wanted[:coded]) + [
            compact[r, :w] if want else None
            for r, w, want in zip(self.rows, self.widths, wanted[coded:], strict=True)]

    def sums_per_value(self, columns: Sequence[CodeColumns | _ExactPoints],
                       grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
        coded = len(self.coded.rows)
        out = torch.zeros_like(like)
        if not self.coded.sums_into(columns[:coded], grads[:coded], out):
            return self.from_dense(_sums_per_code(columns, grads), like)
        return self._put_exact(out, grads[coded:])

    def from_dense(self, per_code: Sequence[Tensor | None], like: Tensor) -> Tensor:
        coded = len(self.coded.rows)
        out = torch.zeros_like(like)
        part = self.coded.from_dense(per_code[:coded], like[: self.coded_rows])
        out[: self.coded_rows, : part.shape[1]] = part
        return self._put_exact(out, per_code[coded:])

    def _put_exact(self, out: Tensor, per_point: Sequence[Tensor | None]) -> Tensor:
        """``out`` with each exact tensor's (P_t, n_t) values (its table is its points) in its
        row block; a tensor without one keeps its zeros."""
        for r, w, values in zip(self.rows, self.widths, per_point, strict=True):
            if values is not None:
                out[r, :w] = values
        return out


def _sums_per_code(columns: Sequence[CodeColumns | _ExactPoints],
                   grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each tensor's sums of its ``grads`` per code (an exact tensor's: its gradient)."""
    return [None if g is None else column.sum_per_code(g)
            for column, g in zip(columns, grads, strict=True)]


def _padded(parts: list[Tensor], width: int) -> Tensor:
    """(P_t, w_t) blocks stacked into (sum P_t, width), zero padded on the right (one
    operator call where every block is ``width`` wide)."""
    if all(p.shape[1] == width for p in parts):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    out = parts[0].new_zeros(sum(p.shape[0] for p in parts), width)
    row = 0
    for p in parts:
        out[row:row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return out


class _UniqueDKM(torch.autograd.Function):
    """DKM of every tensor ``xs[t]`` (P_t, n_t) from ``centroids[t]`` (P_t, k_t) (weight
    units) on the distinct values of their float16 codes, all palettes of all tensors in one
    call of the weighted core (:mod:`.weighted`): values padded with count 0, centroids padded
    and masked, one ``inv_tau`` per palette. One tensor is the single-tensor step. Each tensor
    stops early on its own.

    Autograd passes the results as one flat tuple: the soft weights (P_t, n_t, differentiable),
    the final centroids (P_t, k_t) and the iteration counts (as
    :attr:`~.numerics.DKMOutput.iterations`), one of each per tensor, then the per-code output
    tables of the rebuilding tensors only."""

    @staticmethod
    def forward(ctx, config: _Config, *inputs: Tensor):
        normalizations, device_side = config.normalizations, config.device_side
        T = len(config.palettes)
        xs, centroids = inputs[:T], inputs[T:]
        rows, row = [], 0
        for x in xs:
            rows.append(slice(row, row + x.shape[0]))
            row += x.shape[0]
        layout: _OwnLayouts | _SharedLayout | _WithExactRows
        coded = T - config.exact
        if all(norm is None for norm in normalizations):
            codes, columns, shared, center, scale = prepare_shared(
                [x.detach() for x in xs[:coded]], device_side)
            layout = _SharedLayout(shared, rows[:coded], center, scale)
            center_all, scale_all = center, scale  # (P, 1): every row's
            values, counts = [shared.values], [shared.counts]
            exact_norms = [normalization_of(x.detach()) for x in xs[coded:]]
            for x, norm in zip(xs[coded:], exact_norms, strict=True):  # rows after the coded
                values.append((x.detach() - norm.center) / norm.scale)  # ones' (chunked's)
                counts.append(torch.ones_like(values[-1]))
                columns.append(_ExactPoints())
            if config.exact:
                exact_centers = [norm.center for norm in exact_norms]
                exact_scales = [norm.scale for norm in exact_norms]
                layout = _WithExactRows(layout, rows[coded:], [x.shape[1] for x in xs[coded:]],
                                        exact_centers, exact_scales)
                center_all = torch.cat([center, *exact_centers])
                scale_all = torch.cat([scale, *exact_scales])
        else:  # each tensor its own layout; its table columns converted once
            codes, columns, distinct, centers, scales = zip(*(
                prepare(x.detach(), norm, device_side)
                for x, norm in zip(xs, normalizations, strict=True)), strict=True)
            layout = _OwnLayouts(distinct, rows, centers, scales)
            values, counts = [d.values for d in distinct], [d.counts for d in distinct]
            center_all, scale_all = torch.cat(centers), torch.cat(scales)
        width = max(v.shape[1] for v in values)
        batch_values = _padded(values, width).unsqueeze(1)  # (P, 1, U)
        batch_counts = _padded(counts, width)
        k = max(c.shape[1] for c in centroids)
        # normalised for the whole batch at once (elementwise: each palette's value is its own)
        c0 = (_padded(list(centroids), k) - center_all) / scale_all
        mask = None
        if any(c.shape[1] != k for c in centroids):
            mask = _padded([torch.ones_like(c, dtype=torch.bool) for c in centroids], k)
            c0 = torch.where(mask, c0, 0.0)  # padding: 0, not a normalised 0
            mask = mask.unsqueeze(-1)
        c0 = c0.unsqueeze(-1)
        groups = None if T == 1 else Groups.of_sizes(config.palettes, batch_values.device)
        y, c_final, trajectory = weighted_dkm(batch_values, batch_counts, c0, config.inv_tau,
                                              max_iter=config.max_iter, epsilon=config.epsilon,
                                              implicit=config.implicit, centroid_mask=mask,
                                              groups=groups)
        outputs, finals, tables = [], [], []
        final_all = c_final[:, :, 0] * scale_all + center_all  # (P, k): each tensor's rows
        for r, x, c, table, column, again in zip(
                rows, xs, centroids, layout.soft_tables(y[:, 0]), columns,
                config.codes_once, strict=True):
            table = table.to(x.dtype)
            outputs.append(column.look_up(table))
            finals.append(final_all[r, : c.shape[1]])
            if again:  # its own tensor: an output of the step, not a view of the batch's
                tables.append(table.clone() if layout.shares_tables else table)
        ctx.layout = layout  # the codes are saved below
        # A rebuilding tensor keeps its input instead of its codes (a view of the caller's
        # weight, which exists anyway) and computes the codes again in the backward.
        kept = [x if again else code
                for x, code, again in zip(xs[:coded], codes[:coded],
                                          config.codes_once[:coded], strict=True)]
        save_trajectory(ctx, trajectory, batch_values, batch_counts,
                        *kept, *([mask] if mask is not None else []), inv_tau=config.inv_tau)
        ctx.codes_once, ctx.normalizations = config.codes_once, normalizations
        ctx.count, ctx.coded, ctx.has_mask = T, coded, mask is not None
        ctx.set_materialize_grads(False)  # an unused tensor's gradient stays None: no work
        ctx.implicit, ctx.device_side = config.implicit, device_side
        ctx.mark_non_differentiable(*finals, *tables)
        iterations = tuple(trajectory.count(r.start) for r in rows)
        return *outputs, *finals, *iterations, *tables

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        device = next(g.device.type for g in grads[: ctx.count] if g is not None)
        with autocast_disabled(device):
            return (None, *_unique_backward(ctx, grads[: ctx.count]))


def _unique_backward(ctx, grads: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Each weight's gradient :math:`s_u + b_u g_i` (module docstring) from one call of the
    core's backward on the batch's distinct values, for the gradient summed per value. A
    tensor whose output got no gradient gets none."""
    trajectory, saved, inv_tau = load_trajectory(ctx)
    values, counts, *rest = saved
    kept, mask = rest[: ctx.coded], (rest[ctx.coded] if ctx.has_mask else None)
    codes = [k if again is None else again.take_codes(k, norm, ctx.device_side)
             for k, norm, again in zip(kept, ctx.normalizations[: ctx.coded],
                                       ctx.codes_once[: ctx.coded], strict=True)]
    columns: list[CodeColumns | _ExactPoints] = [CodeColumns(c, ctx.device_side) for c in codes]
    columns += [_ExactPoints()] * (ctx.count - ctx.coded)
    layout = ctx.layout
    G = layout.sums_per_value(columns, [None if g is None else g.to(values.dtype)
                                        for g in grads], values[:, 0]).unsqueeze(1)  # (P, 1, U)
    shared, b = weighted_dkm_gradient(values, counts, trajectory, G, inv_tau,
                                      implicit=ctx.implicit, check_errors=not ctx.device_side,
                                      centroid_mask=mask)
    assert b is not None
    wanted = [g is not None for g in grads]
    # d L / d x_i = s_u + b_u g_i, with u the value of weight i: two table lookups.
    out: list[Tensor | None] = []
    for column, g, a_table, b_table in zip(columns, grads, layout.to_dense(shared[:, 0], wanted),
                                           layout.to_dense(b[:, 0], wanted), strict=True):
        if g is None:
            out.append(None)
            continue
        grad = column.look_up(a_table, factor=(b_table, g.to(values.dtype)))
        out.append(grad.to(g.dtype))
    return [*out, *([None] * ctx.count)]  # no gradient for the starting centroids


def unique_dkm_batch(
    xs: Sequence[Tensor],
    centroids: Sequence[Tensor],
    taus: Sequence[Tensor | float],
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalizations: Sequence[Normalization | None] | None = None,
    gradient: Gradient = "unrolled",
    rebuild: Sequence[bool] | None = None,
    exact: Sequence[bool] | None = None,
) -> list[DKMOutput]:
    """:func:`unique_dkm_cluster` of several tensors in one call of the weighted core: every
    palette of every tensor (different sizes, ``k`` and taus) in one padded batch, so that the
    DKM iterations and their backward run as one chain of ops for the whole model instead of
    one per tensor. Each result equals that tensor's own call (up to float summation order):
    every tensor stops early on its own (:class:`~.numerics.EarlyStop` with groups; the batch
    runs until the last one has stopped, the rounds after a tensor's stop leave it as it was)
    and reports its own count.

    ``rebuild[t]``: keep tensor ``t``'s input for the backward instead of its float16 codes
    (``2 n`` bytes less; the codes are computed again there, one pass over the input) and give
    its output a :attr:`~.numerics.DKMOutput.rebuild`, so that a saved-tensor hook can drop the
    ``n`` soft weights until the backward too (:mod:`.rebuild`). It takes effect where the
    input needs no conversion to the compute dtype (a float32 weight: the step's input is then
    a view of it, memory that exists anyway); elsewhere it is ignored. The values and
    gradients are the same either way.

    ``exact[t]``: cluster tensor ``t`` on its exact weights instead of their float16 codes,
    each weight a point of count 1, normalised as :mod:`.chunked` normalises: its result is
    :func:`~.chunked.chunked_dkm_cluster`'s up to float summation order, for the cost of a few
    rows of the batch instead of a call of its own (``implementation="auto"`` takes
    ``"chunked"`` for small tensors, whose own call is mostly fixed cost). Needs at least one
    tensor on its codes, no ``normalizations`` and no ``rebuild`` for it."""
    T = len(xs)
    if T == 0 or len(centroids) != T or len(taus) != T:
        raise ValueError(f"unique_dkm_batch needs one centroid tensor and one tau per tensor; "
                         f"got {T} tensors, {len(centroids)} centroids, {len(taus)} taus")
    on_exact = tuple(exact) if exact is not None else (False,) * T
    if len(on_exact) != T:
        raise ValueError(f"exact needs one flag per tensor; got {len(on_exact)} for {T}")
    if any(on_exact):
        if all(on_exact):
            raise ValueError("exact: at least one tensor of the batch must be on its codes")
        if normalizations is not None or any(
                r and e for r, e in zip(rebuild or (False,) * T, on_exact, strict=True)):
            raise ValueError("exact: a tensor on its exact weights takes no normalization and "
                             "no rebuild")
        if not all(on_exact[i] <= on_exact[i + 1] for i in range(T - 1)):  # codes first
            order = sorted(range(T), key=lambda t: on_exact[t])
            results = unique_dkm_batch(
                [xs[t] for t in order], [centroids[t] for t in order], [taus[t] for t in order],
                max_iter=max_iter, epsilon=epsilon, gradient=gradient,
                rebuild=None if rebuild is None else [rebuild[t] for t in order],
                exact=[on_exact[t] for t in order])
            back = [0] * T
            for position, t in enumerate(order):
                back[t] = position
            return [results[back[t]] for t in range(T)]
    check_gradient(gradient, "unique")
    for x, tau in zip(xs, taus, strict=True):
        if x.shape[-1] != 1:
            raise ValueError(f"the 'unique' DKM step needs cluster_dim 1; got {x.shape[-1]}")
        check_step_arguments(tau, max_iter, epsilon)
    compute_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    device_side = not host_reads_are_free(xs[0])
    norms = tuple(normalizations) if normalizations is not None else (None,) * T
    again = tuple(CodesOnce() if r and x.dtype == compute_dtype else None
                  for r, x in zip(rebuild or (False,) * T, xs, strict=True))
    inputs = [x.squeeze(-1).to(compute_dtype) for x in xs]
    with autocast_disabled(xs[0].device.type):
        palettes = tuple(x.shape[0] for x in inputs)
        inv_tau = (inverse_temperature(taus[0], compute_dtype) if T == 1 else
                   palette_inverse_temperatures(taus, palettes, compute_dtype, xs[0].device))
        config = _Config(norms, inv_tau, palettes, max_iter, epsilon, gradient == "implicit",
                         device_side, again, sum(on_exact))
        flat = _UniqueDKM.apply(config, *inputs,
                                *(c.detach().squeeze(-1).to(compute_dtype) for c in centroids))
    outputs, finals, iterations = flat[:T], flat[T:2 * T], flat[2 * T:3 * T]
    tables = iter(flat[3 * T:])  # the rebuilding tensors', in order
    return [DKMOutput(out.unsqueeze(-1).to(x.dtype), final.to(c.dtype).unsqueeze(-1),
                      out.new_empty(0), count,
                      rebuild=functools.partial(rebuilt_soft_weights, inp, norm, device_side,
                                                next(tables), x.dtype, a) if a else None)
            for out, final, x, c, count, inp, norm, a in zip(
                outputs, finals, xs, centroids, iterations, inputs, norms, again, strict=True)]


def unique_dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
    gradient: Gradient = "unrolled",
    rebuild: bool = False,
) -> DKMOutput:
    """DKM for ``cluster_dim = 1`` on the distinct float16 values of the normalised weights.

    Same arguments and outputs as :func:`~.reference.dkm_cluster` (``attention`` is an empty
    tensor); values and gradients are those of DKM on the rounded weights (module docstring).
    ``gradient``: ``"unrolled"`` (through every iteration) or ``"implicit"`` (IDKM, at the
    fixed point, with work and memory independent of ``max_iter``: :mod:`.weighted`).

    Runs in at least float32 with autocast off; without host reads (an accelerator,
    ``torch.compile``) on the full table of float16 codes, with the early stop decided on the
    device (module docstring). ``rebuild``: as in :func:`unique_dkm_batch`.
    """
    return unique_dkm_batch([x], [centroids], [tau], max_iter=max_iter, epsilon=epsilon,
                            normalizations=[normalization], gradient=gradient,
                            rebuild=[rebuild])[0]
