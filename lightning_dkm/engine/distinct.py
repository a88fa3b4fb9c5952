r"""DKM on the distinct half-precision values of a tensor (the eDKM idea, arXiv 2309.00964).

For scalar clustering (``cluster_dim = 1``) the attention of a weight depends only on its
value. Rounded to float16 *after normalisation* (unit variance, so float16's relative precision
of :math:`2^{-11}` is what matters, not its range), a palette has at most 65,536 distinct values,
about 2 x 10^4 for half a million Gaussian weights. This step runs every DKM iteration on the
distinct values ``u`` with their counts :math:`w_u`, forward and backward; cost per step
``O(n + U k max_iter)`` instead of ``O(n k max_iter)``.

**What touches every weight, and why it is so little.** On CPU an O(n) pass costs mostly the
fresh memory it writes (page faults), so the step writes little and works in chunks of
``CHUNK`` weights whose temporaries the allocator reuses. The forward rounds
``(x - mean) / 2^e`` to float16 (``2^e`` is the power of two nearest the palette's standard
deviation, so the scaling is exact and float16 keeps its full relative precision); each bit
pattern is a column of a dense table of 65,536 entries per palette. It counts the columns
(``bincount``) and reads each output from a table of the clustered values per code, already
in the weights' units (one ``index_select``). The standard deviation that sets tau's units
comes from the counted values, not from another pass over the weights. The backward sums the
incoming gradient per code (a weighted ``bincount``) and forms each weight's gradient
:math:`a_u + b_u g_i` from two table lookups. Normalising and denormalising happen on the
distinct values: the normalisation constants cancel in the gradient. Autograd saves the
float16 codes (2 bytes per weight) and ``O(U k max_iter)`` for the values.

**What is approximated, and how much.** The attention and the weights in the centroid sums are
those of the float16-rounded value of each (centred, power-of-two-scaled) weight; the gradient
passes straight through the rounding. The result is *exactly* DKM of the rounded weights (the
tests compare with the reference step on float16-representable inputs to 1e-5). On arbitrary
weights the values differ by the rounding (``|dx| <= 2^{-11} |x - mean|``, at most ~3e-4 of the
standard deviation for weights within 1 std of the mean)
times the attention's sensitivity, which is large only for weights on a cluster boundary;
``docs/benchmarks.md`` gives the measured difference.

**Without host reads** (:func:`~lightning_dkm.engine.numerics.host_reads_are_free`: on an
accelerator,
under ``torch.compile``, in :func:`~lightning_dkm.engine.numerics.sync_free`) the padded layout
cannot be
sized by the widest palette's count of distinct values (``nonzero`` and that count would be
read back), so it takes ``min(n, 65536)`` columns, a bound from the shape, and each occupied
code goes to the column of its rank (a cumulative sum); the columns past a palette's last
distinct value hold value 0 and count 0, so they add nothing to any sum. Counting uses
``index_add_`` into the fixed-size table (``bincount`` reads its input's maximum back), the
rough standard deviation picks its fallback with ``torch.where``, and the early stop is decided
on the device (:class:`~lightning_dkm.engine.numerics.EarlyStop`). The values are those of the
compact
layout up to the summation order; the iterations do up to ``min(n, 65536) / U`` times the work
(about 3x for half a million Gaussian weights), which an accelerator does in microseconds.

**The DKM itself** is the weighted core's (:mod:`.weighted`), fed the distinct values and
their counts: its forward, and its backward for the gradient summed per value, which gives
every weight ``i`` of value ``u`` the gradient :math:`s_u + b_u g_i` (exact for the rounded
problem; the derivation is the core's, written once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .numerics import (
    DKMOutput,
    Normalization,
    autocast_disabled,
    check_step_arguments,
    host_reads_are_free,
    inverse_temperature,
    scale_floor,
)
from .weighted import (
    Gradient,
    check_gradient_name,
    load_trajectory,
    save_trajectory,
    weighted_dkm,
    weighted_dkm_gradient,
)

__all__ = ["CHUNK", "unique_dkm_batch", "unique_dkm_cluster"]

#: Weights per chunk of the O(n) passes: a chunk's temporaries (a few MiB) come from the
#: allocator's free lists, where whole-tensor temporaries of large weights would be fresh
#: pages (page faults cost more than the passes themselves on CPU).
CHUNK = 1 << 20

_CODES = 1 << 16  # float16 bit patterns per palette
_TINY = 1e-30  # keeps log2 finite for a constant palette


class _DistinctValues(NamedTuple):
    """The occupied codes of every palette, compacted into a padded ``(P, U)`` layout: with
    ``ids`` (``U`` the most distinct values of a palette, :func:`_distinct_values`), or with
    ``slots`` (``U = min(n, 65536)``, a bound from the shape, :func:`_static_distinct_values`).
    """

    ids: Tensor | None  # (V,) flat ids ``palette * 65536 + bit pattern`` of the occupied codes
    rows: Tensor | None  # (V,) their palette (None for a single palette)
    cols: Tensor | None  # (V,) their place in the palette's row of the padded layout
    values: Tensor  # (P, U) the float16 values (as float32), 0 in padding
    counts: Tensor  # (P, U) weights per value, 0 in padding
    slots: Tensor | None = None  # (P, 65536) each code's column; U (a spare one) if unoccupied

    def to_dense(self, compact: Tensor) -> Tensor:
        """(P, U) per distinct value -> (P * 65536,) per code. Entries of unoccupied codes
        are arbitrary: no weight has such a code, so nothing ever reads them."""
        P = compact.shape[0]
        if self.slots is not None:
            spare = torch.cat((compact, compact.new_zeros(P, 1)), 1)
            return spare.gather(1, self.slots).view(-1)
        assert self.ids is not None
        picked = compact.view(-1) if self.rows is None else compact[self.rows, self.cols]
        return compact.new_empty(P * _CODES).scatter_(0, self.ids, picked)

    def from_dense(self, dense: Tensor) -> Tensor:
        """(P * 65536,) per code -> (P, U) per distinct value (0 in padding)."""
        if self.slots is not None:
            P, width = self.counts.shape
            compact = dense.new_zeros(P, width + 1)
            return compact.scatter_(1, self.slots, dense.view(P, _CODES))[:, :width]
        assert self.ids is not None
        picked = dense.index_select(0, self.ids)
        if self.rows is None:
            return picked.unsqueeze(0)
        compact = dense.new_zeros(self.counts.shape)
        compact[self.rows, self.cols] = picked
        return compact


@torch.no_grad()
def _float16_codes(x: Tensor, normalization: Normalization | None, device_side: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Each weight's code: ``(x - center) / unit`` rounded to float16 (P, n). Also returns the
    centres (P, 1), the power-of-two units (P, 1) and the normalisation's scale (P, 1) when
    one was given (else ``None``: it is computed from the distinct values)."""
    P, n = x.shape
    if normalization is None:
        center = x.mean(dim=1, keepdim=True)
        scale = None
        rough = _rough_std(x, center, device_side)
    else:
        center = normalization.center.reshape(P, 1).to(x.dtype)
        scale = normalization.scale.reshape(P, 1).to(x.dtype)
        rough = scale
    unit = torch.exp2(torch.round(torch.log2(rough.clamp_min(_TINY))))
    inverse_unit = 1.0 / unit  # exact: a power of two
    codes = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    buffer = torch.empty(P, min(n, CHUNK), dtype=x.dtype, device=x.device)
    for part in _chunks(n):
        chunk = buffer[:, : part.stop - part.start]
        torch.sub(x[:, part], center, out=chunk).mul_(inverse_unit)
        codes[:, part] = chunk  # the one rounding, float32 -> float16
    return codes, center, unit, scale


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(start + CHUNK, n))


class _CodeColumns:
    """The table columns ``palette * 65536 + bit pattern`` (int32) of float16 ``codes``
    (P, n), a chunk at a time; a tensor that fits in one chunk converts its codes once.
    ``device_side``: sums per code with ``index_add_`` (no host read) instead of ``bincount``."""

    def __init__(self, codes: Tensor, device_side: bool = False) -> None:
        self.codes = codes
        self.device_side = device_side
        self._whole: Tensor | None = None

    def chunks(self):
        """Yields ``(slice of the weights, flat columns (P * m,))``."""
        n = self.codes.shape[1]
        if n <= CHUNK:
            if self._whole is None:
                self._whole = self._convert(self.codes)
            yield slice(0, n), self._whole
            return
        for part in _chunks(n):
            yield part, self._convert(self.codes[:, part])

    @staticmethod
    def _convert(codes: Tensor) -> Tensor:
        columns = codes.view(torch.uint16).to(torch.int32)
        P = codes.shape[0]
        if P > 1:
            columns += torch.arange(0, P * _CODES, _CODES, device=codes.device,
                                    dtype=torch.int32).unsqueeze(1)
        return columns.view(-1)

    def sum_per_code(self, weights: Tensor | None = None) -> Tensor:
        """(P * 65536,) per code: how many weights have it, or the sum of ``weights`` (P, n)
        over them."""
        size = self.codes.shape[0] * _CODES
        if self.device_side:
            dtype = torch.long if weights is None else weights.dtype
            table = torch.zeros(size, dtype=dtype, device=self.codes.device)
            for part, columns in self.chunks():
                source = (torch.ones((), dtype=dtype, device=table.device).expand(columns.numel())
                          if weights is None else weights[:, part].reshape(-1))
                table.index_add_(0, columns, source)
            return table
        total = None
        for part, columns in self.chunks():
            chunk_weights = None if weights is None else weights[:, part].reshape(-1)
            counts = torch.bincount(columns, weights=chunk_weights, minlength=size)
            total = counts if total is None else total.add_(counts)
        assert total is not None
        return total

    def look_up(self, table: Tensor, factor: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(P, n): ``table[column]`` per weight, or with ``factor = (table_b, g)``
        ``table[column] + table_b[column] * g``."""
        P, n = self.codes.shape
        out = None if n <= CHUNK else table.new_empty(P, n)
        for part, columns in self.chunks():
            values = table.index_select(0, columns).view(P, -1)
            if factor is not None:
                table_b, g = factor
                values = torch.addcmul(values, table_b.index_select(0, columns).view(P, -1),
                                       g[:, part], out=None if out is None else out[:, part])
            if out is None:
                return values
            if factor is None:
                out[:, part] = values
        assert out is not None
        return out


def _rough_std(x: Tensor, center: Tensor, device_side: bool = False) -> Tensor:
    """The standard deviation (P, 1) about ``center`` from ``|x|^2 / n - center^2`` (no
    temporary the size of ``x``); where that cancels badly (a mean far larger than the
    spread), from the deviations themselves. Only needs to be right within a factor of ~1.4:
    it picks the power of two that scales the float16 rounding. ``device_side``: both are
    computed and ``torch.where`` picks (no read of the test; one more pass, cheap on an
    accelerator)."""
    n = x.shape[1]
    mean_square = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_().div_(n)
    variance = mean_square - center.square()
    cancels = variance < 1e-4 * mean_square
    if device_side:
        exact = torch.var(x, dim=1, keepdim=True, correction=0)
        variance = torch.where(cancels, exact, variance)
    elif bool(cancels.any()):
        variance = torch.linalg.vector_norm(x - center, dim=1, keepdim=True).square_().div_(n)
    return variance.clamp_min(0.0).sqrt_()


def _distinct_values(columns: _CodeColumns, dtype: torch.dtype) -> _DistinctValues:
    """The occupied codes, with their float16 values (in units of the palette's ``unit``)
    and counts."""
    P = columns.codes.shape[0]
    dense_counts = columns.sum_per_code()
    ids = dense_counts.nonzero().squeeze(1)
    if P == 1:
        values = ids.to(torch.int16).view(torch.float16).to(dtype)  # int16 wraps like uint16
        counts = dense_counts[ids].to(dtype)
        return _DistinctValues(ids, None, None, values.unsqueeze(0), counts.unsqueeze(0))
    rows = torch.div(ids, _CODES, rounding_mode="floor")
    per_palette = torch.bincount(rows, minlength=P)
    width = int(per_palette.max())
    starts = per_palette.cumsum(0) - per_palette
    cols = torch.arange(ids.numel(), device=ids.device) - starts[rows]
    bit_patterns = (ids - rows * _CODES).to(torch.int16)
    values = torch.zeros(P, width, dtype=dtype, device=ids.device)
    counts = torch.zeros(P, width, dtype=dtype, device=ids.device)
    values[rows, cols] = bit_patterns.view(torch.float16).to(dtype)
    counts[rows, cols] = dense_counts[ids].to(dtype)
    return _DistinctValues(ids, rows, cols, values, counts)


def _static_distinct_values(columns: _CodeColumns, dtype: torch.dtype) -> _DistinctValues:
    """The occupied codes with their values and counts, as :func:`_distinct_values` gives
    them, but in a ``(P, U)`` layout of ``U = min(n, 65536)`` columns, a bound known from the
    shape: nothing is read back. A code's column is its rank among the palette's occupied
    codes (a cumulative sum); the columns past a palette's last distinct value hold value 0
    and count 0, so they add nothing to any sum."""
    P, n = columns.codes.shape
    width = min(n, _CODES)
    dense_counts = columns.sum_per_code().view(P, _CODES)
    occupied = dense_counts > 0
    slots = torch.where(occupied, occupied.cumsum(1) - 1, width)  # (P, 65536)
    patterns = torch.arange(_CODES, dtype=torch.int32, device=slots.device).to(torch.int16)
    code_values = torch.where(occupied, patterns.view(torch.float16).to(dtype), 0.0)
    values = code_values.new_zeros(P, width + 1).scatter_(1, slots, code_values)[:, :width]
    counts = values.new_zeros(P, width + 1).scatter_(1, slots, dense_counts.to(dtype))
    return _DistinctValues(None, None, None, values, counts[:, :width], slots)


def _scale_from_values(distinct: _DistinctValues, unit: Tensor, center: Tensor) -> Tensor:
    """The palettes' standard deviation about ``center`` (P, 1), from the rounded values and
    their counts, with the same floor as :func:`~lightning_dkm.engine.numerics.scale_of`."""
    second_moment = (distinct.counts * distinct.values.square()).sum(1, keepdim=True)
    std = second_moment.div_(distinct.counts.sum(1, keepdim=True)).sqrt_() * unit
    return torch.maximum(std, scale_floor(center))


class _Tensor(NamedTuple):
    """One tensor of a batch between the forward and the backward: its codes, where its
    distinct values are, and which rows / columns of the batch they fill."""

    codes: Tensor  # (P, n) float16 codes
    distinct: _DistinctValues  # the values dropped (they live in the batch)
    rows: slice  # its palettes among the batch's
    width: int  # its number of distinct-value columns (U_t)


def _prepare(x: Tensor, normalization: Normalization | None, device_side: bool
             ) -> tuple[Tensor, _CodeColumns, _DistinctValues, Tensor, Tensor]:
    """Codes, columns, distinct values (normalised in place), centre and scale of ``x`` (P, n)."""
    codes, center, unit, scale = _float16_codes(x, normalization, device_side)
    columns = _CodeColumns(codes, device_side)
    distinct = (_static_distinct_values if device_side else _distinct_values)(
        columns, center.dtype
    )
    if scale is None:
        scale = _scale_from_values(distinct, unit, center)
    distinct.values.mul_(unit / scale)  # normalised: (x - center) / scale
    return codes, columns, distinct, center, scale


def _padded(parts: list[Tensor], width: int) -> Tensor:
    """(P_t, w_t) blocks stacked into (sum P_t, width), zero padded on the right."""
    if len(parts) == 1 and parts[0].shape[1] == width:
        return parts[0]
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
    and masked, one ``inv_tau`` per palette. One tensor is the single-tensor step. Returns the
    soft weights of each tensor, then its final centroids, then its iteration count (each
    tensor stops early on its own)."""

    @staticmethod
    def forward(ctx, config: tuple, *inputs: Tensor):
        normalizations, inv_taus, max_iter, epsilon, implicit, device_side = config
        T = len(inv_taus)
        xs, centroids = inputs[:T], inputs[T:]
        tensors, values, counts, starts, centers, scales = [], [], [], [], [], []
        row = 0
        for x, c, norm in zip(xs, centroids, normalizations, strict=True):
            codes, _, distinct, center, scale = _prepare(x.detach(), norm, device_side)
            tensors.append(_Tensor(codes, distinct._replace(values=None),
                                   slice(row, row + x.shape[0]), distinct.values.shape[1]))
            values.append(distinct.values)
            counts.append(distinct.counts)
            starts.append((c - center) / scale)
            centers.append(center)
            scales.append(scale)
            row += x.shape[0]
        width = max(t.width for t in tensors)
        k = max(c.shape[1] for c in centroids)
        batch_values = _padded(values, width).unsqueeze(1)  # (P, 1, U)
        batch_counts = _padded(counts, width)
        c0 = _padded(starts, k).unsqueeze(-1)  # (P, k, 1)
        mask = None
        if any(c.shape[1] != k for c in centroids):
            mask = _padded([torch.ones_like(c, dtype=torch.bool) for c in centroids], k)
            mask = mask.unsqueeze(-1)
        inv_tau = inv_taus[0] if T == 1 else torch.cat([
            torch.as_tensor(t, dtype=batch_values.dtype, device=batch_values.device)
            .reshape(1).expand(x.shape[0]) for t, x in zip(inv_taus, xs, strict=True)
        ]).reshape(-1, 1, 1)
        groups = None if T == 1 else torch.cat([
            torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            for i, x in enumerate(xs)])
        y, c_final, trajectory = weighted_dkm(batch_values, batch_counts, c0, inv_tau,
                                              max_iter=max_iter, epsilon=epsilon,
                                              implicit=implicit, centroid_mask=mask,
                                              groups=groups)
        outputs, finals = [], []
        for t, x, c, center, scale, distinct_values in zip(
                tensors, xs, centroids, centers, scales, values, strict=True):
            y_t = y[t.rows, 0, : t.width] * scale + center
            columns = _CodeColumns(t.codes, device_side)
            distinct = t.distinct._replace(values=distinct_values)
            outputs.append(columns.look_up(distinct.to_dense(y_t.to(x.dtype))))
            finals.append(c_final[t.rows, : c.shape[1], 0] * scale + center)
        ctx.tensors = [t._replace(codes=None) for t in tensors]  # the codes are saved below
        save_trajectory(ctx, trajectory, batch_values, batch_counts,
                        *[t.codes for t in tensors], *([mask] if mask is not None else []),
                        inv_tau=inv_tau)
        ctx.count, ctx.has_mask = T, mask is not None
        ctx.set_materialize_grads(False)  # an unused tensor's gradient stays None: no work
        ctx.implicit, ctx.device_side = implicit, device_side
        ctx.mark_non_differentiable(*finals)
        last = trajectory.last
        iterations = [last[t.rows.start] if isinstance(last, Tensor) and last.ndim else last
                      for t in tensors]
        return (*outputs, *finals, *iterations)

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
    codes, mask = rest[: ctx.count], (rest[ctx.count] if ctx.has_mask else None)
    columns = [_CodeColumns(c, ctx.device_side) for c in codes]
    G = torch.zeros_like(values)  # (P, 1, U)
    for t, column, g in zip(ctx.tensors, columns, grads, strict=True):
        if g is not None:
            per_code = column.sum_per_code(g.to(values.dtype)).to(values.dtype)
            G[t.rows, 0, : t.width] = t.distinct.from_dense(per_code)
    shared, b = weighted_dkm_gradient(values, counts, trajectory, G, inv_tau,
                                      implicit=ctx.implicit, check_errors=not ctx.device_side,
                                      centroid_mask=mask)
    assert b is not None
    out: list[Tensor | None] = []
    for t, column, g in zip(ctx.tensors, columns, grads, strict=True):
        if g is None:
            out.append(None)
            continue
        # d L / d x_i = s_u + b_u g_i, with u the value of weight i: two table lookups.
        grad = column.look_up(t.distinct.to_dense(shared[t.rows, 0, : t.width]),
                              factor=(t.distinct.to_dense(b[t.rows, 0, : t.width]),
                                      g.to(values.dtype)))
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
) -> list[DKMOutput]:
    """:func:`unique_dkm_cluster` of several tensors in one call of the weighted core: every
    palette of every tensor (different sizes, ``k`` and taus) in one padded batch, so that the
    DKM iterations and their backward run as one chain of ops for the whole model instead of
    one per tensor. Each result equals that tensor's own call (up to float summation order):
    every tensor stops early on its own (:class:`~.numerics.EarlyStop` with groups; the batch
    runs until the last one has stopped, the rounds after a tensor's stop leave it as it was)
    and reports its own count."""
    T = len(xs)
    if T == 0 or len(centroids) != T or len(taus) != T:
        raise ValueError(f"unique_dkm_batch needs one centroid tensor and one tau per tensor; "
                         f"got {T} tensors, {len(centroids)} centroids, {len(taus)} taus")
    check_gradient_name(gradient)
    for x, tau in zip(xs, taus, strict=True):
        if x.shape[-1] != 1:
            raise ValueError(f"the 'unique' DKM step needs cluster_dim 1; got {x.shape[-1]}")
        check_step_arguments(tau, max_iter, epsilon)
    compute_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    device_side = not host_reads_are_free(xs[0])
    norms = tuple(normalizations) if normalizations is not None else (None,) * T
    with autocast_disabled(xs[0].device.type):
        config = (norms, tuple(inverse_temperature(t, compute_dtype) for t in taus), max_iter,
                  epsilon, gradient == "implicit", device_side)
        results = _UniqueDKM.apply(
            config, *(x.squeeze(-1).to(compute_dtype) for x in xs),
            *(c.detach().squeeze(-1).to(compute_dtype) for c in centroids),
        )
    outputs, finals, iterations = results[:T], results[T:2 * T], results[2 * T:]
    return [DKMOutput(out.unsqueeze(-1).to(x.dtype), final.to(c.dtype).unsqueeze(-1),
                      out.new_empty(0), count)
            for out, final, x, c, count in zip(outputs, finals, xs, centroids, iterations,
                                               strict=True)]


def unique_dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
    gradient: Gradient = "unrolled",
) -> DKMOutput:
    """DKM for ``cluster_dim = 1`` on the distinct float16 values of the normalised weights.

    Same arguments and outputs as :func:`~lightning_dkm.engine.reference.dkm_cluster` (``attention``
    is an
    empty tensor); values and gradients are those of DKM on the rounded weights (module
    docstring).

    ``gradient="unrolled"`` differentiates through every iteration; ``"implicit"`` (IDKM,
    arXiv 2312.07759) differentiates at the fixed point the iterations approach: the last
    iteration's map, with the adjoint equation :math:`w = r + J^T w` solved exactly (``J`` is
    ``k x k``), so the backward's work and memory do not depend on ``max_iter`` (run as many
    iterations as convergence needs). It equals the unrolled gradient in the limit of many
    iterations (tested), and differs from it after few.

    Runs in at least float32 with autocast off; without host reads (an accelerator,
    ``torch.compile``) on the full table of float16 codes, with the early stop decided on the
    device (module docstring).
    """
    return unique_dkm_batch([x], [centroids], [tau], max_iter=max_iter, epsilon=epsilon,
                            normalizations=[normalization], gradient=gradient)[0]
