"""The float16 codes of a tensor and the tables over them: what the ``"unique"`` DKM step
(:mod:`.distinct`, whose docstring explains the method) does to every weight. Each weight's
code is its centred, power-of-two-scaled value rounded to float16; the occupied codes of a
palette are its distinct values, with their counts (compact, or in a layout sized from the
shape where host reads are not free); per-code tables are read back per weight by lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import native
from .kmeans import nearest_1d_by_ops
from .numerics import Normalization, chunks, floored_scale, root_mean_squares
from .optimal1d import choices_by_loop, choices_by_ops
from .value_grid import cell_sums_by_ops, cells_by_ops

__all__ = [
    "ACCELERATOR_CHUNK", "CHUNK", "CODES", "FLOOR_SHIFT", "CodeColumns", "DistinctValues",
    "code_constants", "distinct_from_counts", "encode", "float16_codes", "normalized_distinct",
    "pass_sizes", "power_of_two_unit", "prepare", "prepare_shared", "static_distinct_from_counts",
]

#: Weights per chunk of the O(n) passes: a chunk's temporaries (a few MiB) come from the
#: allocator's free lists, where whole-tensor temporaries of large weights would be fresh
#: pages (page faults cost more than the passes themselves on CPU).
CHUNK = 1 << 20

#: Weights per piece of a pass's scratch buffer (512 KiB of float32 per palette row): small
#: enough to stay in cache and be reused, where a whole-size temporary would be fresh pages,
#: and few enough pieces that their ops cost little. On 524,288 weights (one thread, process
#: CPU, medians of 40, three runs) 2**17 took 0.47-0.49 ms for the codes and 0.95 ms for the
#: backward's look-up against 0.62-0.63 and 1.12-1.14 ms at 2**15, and 2**18 0.44-0.49 /
#: 0.93-0.96 ms. Each piece's values are those of the whole: the size changes no result.
PIECE = 1 << 17

#: Off the CPU (CUDA, MPS, ...) chunks and pieces are both this many weights (16 MiB of
#: float32 per palette row): there each chunk and piece costs kernel launches from Python and no
#: cache is to be stayed in, so MiniLM's 11.7M-weight embedding takes 3 pieces, not 90
#: (``benchmarks/count_ops.py``). The sizes change no result. (A tensor of up to this many
#: weights keeps its int32 table columns for the look-up, as one of up to :data:`CHUNK` does on
#: the CPU.)
ACCELERATOR_CHUNK = 1 << 22

CODES = 1 << 16  # float16 bit patterns per palette: the columns of a per-code table
_TINY = 1e-30  # keeps log2 finite for a constant palette
_MAX_EXPONENT = 127  # float32's largest power of two: a unit past it would be inf


def pass_sizes(device: torch.device) -> tuple[int, int]:
    """``(chunk, piece)``: the weights per chunk and per scratch piece of the O(n) passes on
    ``device``: :data:`CHUNK` and :data:`PIECE` on the CPU, :data:`ACCELERATOR_CHUNK` for both
    elsewhere."""
    if device.type == "cpu":
        return CHUNK, PIECE
    return ACCELERATOR_CHUNK, ACCELERATOR_CHUNK


#: Binades between the codes' unit and the power of two ``s`` nearest the standard deviation.
#: A code is ``(x - center) / (s 2^14)``: float16's normal range starts at ``2^-14``, so a
#: deviation ``|x - center| >= s`` is rounded with float16's relative precision (``2^-11`` of
#: itself) as before, and a smaller one lands among the subnormals, evenly spaced by
#: ``2^-24 s 2^14 = 2^-10 s``: its rounding error is at most ``2^-11 s``, what a deviation of
#: one ``s`` already had. Relative precision below one standard deviation bought nothing DKM
#: uses (its attention depends on distances, so on absolute errors) but distinct values: a
#: weight matrix has about a quarter as many (17,085 -> 4,096 for the digits CNN's 524,288-weight
#: layer at initialisation), and the DKM iterations run on those.
FLOOR_SHIFT = 14


class DistinctValues(NamedTuple):
    """The occupied codes of every palette, compacted into a padded ``(P, U)`` layout: with
    ``ids`` (``U`` the most distinct values of a palette, :func:`distinct_from_counts`), or with
    ``slots`` (``U = min(n, 65536)``, a bound from the shape, :func:`static_distinct_from_counts`).
    """

    ids: Tensor | None  # (V,) flat ids ``palette * 65536 + bit pattern`` of the occupied codes
    rows: Tensor | None  # (V,) their palette (None for a single palette)
    cols: Tensor | None  # (V,) their place in the palette's row of the padded layout
    values: Tensor  # (P, U) the float16 values (as float32), 0 in padding
    counts: Tensor  # (P, U) weights per value, 0 in padding
    slots: Tensor | None = None  # (P, 65536) each code's column; U (a spare one) if unoccupied
    #: distinct values per palette, where the host knows them (:func:`prepare_shared`'s
    #: marked codes): the range of :attr:`ids` of a palette, for :meth:`~.native.Kernels.sums_at`
    occupied: tuple[int, ...] | None = None

    def to_dense(self, compact: Tensor) -> Tensor:
        """(P, U) per distinct value -> (P * 65536,) per code. Entries of unoccupied codes
        are arbitrary: no weight has such a code, so nothing ever reads them. One loop of
        :mod:`.native` for several palettes where it takes them (the same values)."""
        P = compact.shape[0]
        if self.rows is not None and self.ids is not None:
            loops = native.loops_for(compact)
            spread = None if loops is None else loops.spread(compact, self.ids, self.rows,
                                                             self.cols)
            if spread is not None:
                return spread
        if self.slots is not None:
            spare = torch.cat((compact, compact.new_zeros(P, 1)), 1)
            return spare.gather(1, self.slots).view(-1)
        assert self.ids is not None
        picked = compact.view(-1) if self.rows is None else compact[self.rows, self.cols]
        return compact.new_empty(P * CODES).scatter_(0, self.ids, picked)

    def from_dense(self, dense: Tensor) -> Tensor:
        """(P * 65536,) per code -> (P, U) per distinct value (0 in padding)."""
        if self.slots is not None:
            P, width = self.counts.shape
            compact = dense.new_zeros(P, width + 1)
            return compact.scatter_(1, self.slots, dense.view(P, CODES))[:, :width]
        assert self.ids is not None
        picked = dense.index_select(0, self.ids)
        if self.rows is None:
            return picked.unsqueeze(0)
        compact = dense.new_zeros(self.counts.shape)
        compact[self.rows, self.cols] = picked
        return compact


@torch.no_grad()
def float16_codes(x: Tensor, normalization: Normalization | None, device_side: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Each weight's code: ``(x - center) / unit`` rounded to float16 (P, n). Also returns the
    centres (P, 1), the power-of-two units (P, 1) and the normalisation's scale (P, 1) when
    one was given (else ``None``: it is computed from the distinct values)."""
    center, unit, scale = code_constants(x, normalization, device_side)
    return encode(x, center, unit), center, unit, scale


@torch.no_grad()
def code_constants(x: Tensor, normalization: Normalization | None, device_side: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The centres, power-of-two units and given scales (or ``None``) of
    :func:`float16_codes`, before any weight is encoded."""
    center, rough, scale = _center_and_spread(x, normalization, device_side)
    return center, power_of_two_unit(rough), scale


def _center_and_spread(x: Tensor, normalization: Normalization | None, device_side: bool
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The centres (P, 1), the spreads the units are taken from (the rough standard deviation,
    or the given scale) and the given scales (or ``None``) of :func:`code_constants`."""
    if normalization is None:
        center = x.mean(dim=1, keepdim=True)
        return center, _rough_stds([x], [center], device_side), None
    P = x.shape[0]
    scale = normalization.scale.reshape(P, 1).to(x.dtype)
    return normalization.center.reshape(P, 1).to(x.dtype), scale, scale


def power_of_two_unit(rough: Tensor) -> Tensor:
    """The unit the codes count in: :data:`FLOOR_SHIFT` binades above the power of two nearest
    ``rough`` (a standard deviation within a factor of ~1.4), so that dividing by it is exact
    and deviations below one standard deviation fall into float16's subnormal range, whose
    even spacing is the absolute floor of the rounding (:data:`FLOOR_SHIFT`)."""
    exponent = torch.round(torch.log2(rough.clamp_min(_TINY))) + FLOOR_SHIFT
    return torch.exp2(exponent.clamp_max_(_MAX_EXPONENT))


@torch.no_grad()
def encode(x: Tensor, center: Tensor, unit: Tensor, *, fused: bool = True) -> Tensor:
    """The float16 codes ``(x - center) / unit`` of ``x`` (P, n), ``center`` and ``unit``
    (P, 1): elementwise, so the codes of any part of ``x`` are those of the whole (what
    :mod:`.shard_local` relies on). One loop of :mod:`.native` where it can (``fused``), else
    PyTorch ops, a piece at a time through one reused buffer (:func:`pass_sizes`); the same
    codes."""
    P, n = x.shape
    inverse_unit = 1.0 / unit  # exact: a power of two
    loops = native.loops_for(x, center, inverse_unit) if fused else None
    codes = None if loops is None else loops.encode(x, center, inverse_unit)
    if codes is not None:
        return codes
    codes = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    piece = pass_sizes(x.device)[1]
    buffer = torch.empty(P, min(n, piece), dtype=x.dtype, device=x.device)
    for part in chunks(n, piece):
        chunk = buffer[:, : part.stop - part.start]
        torch.sub(x[:, part], center, out=chunk).mul_(inverse_unit)
        codes[:, part] = chunk  # the one rounding, float32 -> float16
    return codes


class CodeColumns:
    """Counting, summing and looking up per code over float16 ``codes`` (P, n): one loop of
    :mod:`.native` each where it can (``fused``, on the CPU with host reads), else with the
    table columns ``palette * 65536 + bit pattern`` (int32) of the codes, a chunk at a time
    (a tensor that fits in one chunk converts its codes once). ``device_side``: sums per code
    with ``index_add_`` (no host read) instead of ``bincount``."""

    def __init__(self, codes: Tensor, device_side: bool = False, *, fused: bool = True) -> None:
        self.codes = codes
        self.device_side = device_side
        self._whole: Tensor | None = None
        self._loops = native.loops_for(codes) if fused and not device_side else None

    def chunks(self):
        """Yields ``(slice of the weights, flat columns (P * m,))``."""
        n = self.codes.shape[1]
        chunk = pass_sizes(self.codes.device)[0]
        if n <= chunk:
            if self._whole is None:
                self._whole = self._convert(self.codes)
            yield slice(0, n), self._whole
            return
        for part in chunks(n, chunk):
            yield part, self._convert(self.codes[:, part])

    @staticmethod
    def _convert(codes: Tensor) -> Tensor:
        columns = codes.view(torch.uint16).to(torch.int32)
        P = codes.shape[0]
        if P > 1:
            columns += torch.arange(0, P * CODES, CODES, device=codes.device,
                                    dtype=torch.int32).unsqueeze(1)
        return columns.view(-1)

    def sum_per_code(self, weights: Tensor | None = None) -> Tensor:
        """(P * 65536,) per code: how many weights have it, or the sum of ``weights`` (P, n)
        over them."""
        loops = self._loops
        if loops is not None:
            total = (loops.count(self.codes) if weights is None
                     else loops.sum_per_code(self.codes, weights))
            if total is not None:
                return total
        size = self.codes.shape[0] * CODES
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

    def look_up(self, table: Tensor, factor: tuple[Tensor, Tensor] | None = None,
                out: Tensor | None = None) -> Tensor:
        """(P, n): ``table[column]`` per weight, or with ``factor = (table_b, g)``
        ``table[column] + table_b[column] * g``. The result is the one buffer of ``n`` values
        it allocates (or ``out``, (P, n) of ``table``'s dtype, not ``g``): each chunk's
        look-up is written into it in place, and ``table_b``'s values are gathered a
        piece at a time into one small scratch buffer (:func:`pass_sizes`)."""
        P, n = self.codes.shape
        if out is None:
            out = table.new_empty(P, n)
        loops = self._loops
        if loops is not None:
            looked_up = (loops.look_up(self.codes, table, out) if factor is None
                         else loops.look_up_affine(self.codes, table, *factor, out))
            if looked_up is not None:
                return looked_up
        scratch, piece_size = None, pass_sizes(self.codes.device)[1]
        for part, columns in self.chunks():
            target = out[:, part]
            if target.is_contiguous():
                torch.index_select(table, 0, columns, out=target.view(-1))
            else:
                target.copy_(table.index_select(0, columns).view(P, -1))
            if factor is None:
                continue
            table_b, g = factor
            g = g[:, part]
            if P > 1:  # pieces of the flat columns would cut across the palettes' rows
                target.addcmul_(table_b.index_select(0, columns).view(P, -1), g)
                continue
            if scratch is None:
                scratch = table_b.new_empty(min(piece_size, n))
            flat, flat_g = target.view(-1), g.reshape(-1)
            for piece in chunks(columns.numel(), piece_size):
                b = scratch[: piece.stop - piece.start]
                torch.index_select(table_b, 0, columns[piece], out=b)
                flat[piece].addcmul_(b, flat_g[piece])
        return out


def _rough_stds(xs: Sequence[Tensor], centers: Sequence[Tensor], device_side: bool = False
                ) -> Tensor:
    """The standard deviations (sum P_t, 1) of the palettes of ``xs`` (P_t, n_t, one dtype)
    about ``centers`` (P_t, 1) from ``|x|^2 / n - center^2`` (no temporary the size of ``x``);
    from the deviations themselves (:func:`~.numerics.root_mean_squares`) where that cancels
    badly (a mean far larger than the spread) or where float32 cannot hold the squares
    (weights of 1e20 square to 1e40; below about 1e-12 too little room is left above its
    normal range for the cancellation test). Only needs to be right within a factor of ~1.4:
    it picks the power of two that scales the float16 rounding. ``device_side``: both are
    computed and ``torch.where`` picks (no read of the test; the deviations cost three passes
    over ``x``, cheap on an accelerator). One reduction per tensor, the tests one op each for
    every palette of the batch (elementwise: each palette's value is its own)."""
    squares = [torch.linalg.vector_norm(x, dim=1, keepdim=True).square_().div_(x.shape[1])
               for x in xs]
    mean_square = squares[0] if len(squares) == 1 else torch.cat(squares)
    center = centers[0] if len(centers) == 1 else torch.cat(centers)
    variance = mean_square - center.square()
    info = torch.finfo(xs[0].dtype)
    in_range = mean_square.clamp(info.tiny / info.eps**2, info.max) == mean_square
    exact = (variance < 1e-4 * mean_square).logical_or_(in_range.logical_not_())
    rough = variance.clamp_min_(0.0).sqrt_()
    if device_side or bool(exact.any()):
        deviations = root_mean_squares([x - c for x, c in zip(xs, centers, strict=True)])
        rough = torch.where(exact, deviations, rough)
    return rough


def distinct_from_counts(dense_counts: Tensor, P: int, dtype: torch.dtype) -> DistinctValues:
    """The occupied codes of the per-code counts ``(P * 65536,)`` (counted over one tensor, or
    summed over the shards of several ranks, :mod:`.shard_local`), with their float16 values
    (in units of the palette's ``unit``) and counts, compacted to the widest palette's number
    of distinct values (a host read). In two reads of the counts by :mod:`.native`'s loop where
    it takes them and ``dtype`` is float32 (the same tensors), else by PyTorch ops."""
    loops = native.loops_for(dense_counts) if dtype == torch.float32 else None
    compacted = None if loops is None else _distinct_by_loop(loops, dense_counts, P)
    return compacted if compacted is not None else _distinct_by_ops(dense_counts, P, dtype)


def _distinct_by_loop(loops: native.Kernels, dense_counts: Tensor, P: int
                      ) -> DistinctValues | None:
    """:func:`distinct_from_counts` in float32 by :meth:`~.native.Kernels.distinct`, or
    ``None`` where the loop does not take the counts."""
    compacted = loops.distinct(dense_counts, P)
    return None if compacted is None else _from_loop(P, *compacted)


def _from_loop(P: int, ids: Tensor, rows: Tensor, cols: Tensor, patterns: Tensor,
               counts: Tensor, occupied: list[int] | None = None) -> DistinctValues:
    """The distinct values of a compaction loop's tables (:meth:`~.native.Kernels.distinct`,
    :meth:`~.native.Kernels.marked_distinct`): float16 bit patterns as float32 values, no
    palettes or ranks for a single palette, and the number per palette where known."""
    values = patterns.view(torch.float16).to(torch.float32)
    if P == 1:
        rows = cols = None
    return DistinctValues(ids, rows, cols, values, counts,
                          occupied=None if occupied is None else tuple(occupied))


def _distinct_by_ops(dense_counts: Tensor, P: int, dtype: torch.dtype) -> DistinctValues:
    """:func:`distinct_from_counts` by PyTorch ops."""
    ids = dense_counts.nonzero().squeeze(1)
    if P == 1:
        values = ids.to(torch.int16).view(torch.float16).to(dtype)  # int16 wraps like uint16
        counts = dense_counts[ids].to(dtype)
        return DistinctValues(ids, None, None, values.unsqueeze(0), counts.unsqueeze(0))
    rows = torch.div(ids, CODES, rounding_mode="floor")
    per_palette = torch.bincount(rows, minlength=P)
    width = int(per_palette.max())
    starts = per_palette.cumsum(0) - per_palette
    cols = torch.arange(ids.numel(), device=ids.device) - starts[rows]
    bit_patterns = (ids - rows * CODES).to(torch.int16)
    values = torch.zeros(P, width, dtype=dtype, device=ids.device)
    counts = torch.zeros(P, width, dtype=dtype, device=ids.device)
    values[rows, cols] = bit_patterns.view(torch.float16).to(dtype)
    counts[rows, cols] = dense_counts[ids].to(dtype)
    return DistinctValues(ids, rows, cols, values, counts)


def static_distinct_from_counts(dense_counts: Tensor, P: int, n: int, dtype: torch.dtype
                                ) -> DistinctValues:
    """The occupied codes of the per-code counts ``(P * 65536,)`` of ``n`` weights per palette,
    as :func:`distinct_from_counts` gives them, but in the layout of ``min(n, 65536)`` columns
    that needs no host read (:mod:`.distinct`'s module docstring, "Without host reads")."""
    width = min(n, CODES)
    dense_counts = dense_counts.view(P, CODES)
    occupied = dense_counts > 0
    slots = torch.where(occupied, occupied.cumsum(1) - 1, width)  # (P, 65536)
    patterns = torch.arange(CODES, dtype=torch.int32, device=slots.device).to(torch.int16)
    code_values = torch.where(occupied, patterns.view(torch.float16).to(dtype), 0.0)
    values = code_values.new_zeros(P, width + 1).scatter_(1, slots, code_values)[:, :width]
    counts = values.new_zeros(P, width + 1).scatter_(1, slots, dense_counts.to(dtype))
    return DistinctValues(None, None, None, values, counts[:, :width], slots)


def scale_from_values(distinct: DistinctValues, unit: Tensor, center: Tensor) -> Tensor:
    """The palettes' standard deviation about ``center`` (P, 1), from the rounded values and
    their counts, with the same floor as :func:`~lightning_dkm.engine.numerics.normalization_of`
    (:func:`~lightning_dkm.engine.numerics.floored_scale`)."""
    second_moment = (distinct.counts * distinct.values.square()).sum(1, keepdim=True)
    std = second_moment.div_(distinct.counts.sum(1, keepdim=True)).sqrt_() * unit
    return floored_scale(std, center)


def normalized_distinct(dense_counts: Tensor, P: int, n: int, unit: Tensor, center: Tensor,
                        scale: Tensor | None, device_side: bool, dtype: torch.dtype
                        ) -> tuple[DistinctValues, Tensor]:
    """The distinct values of the per-code counts of ``n`` weights per palette, in the
    compact layout or (``device_side``) the one without host reads, normalised in place to
    ``(x - center) / scale``; ``scale`` computed from them where not given. Returns
    ``(distinct, scale)``: what the step and shard-local DKM (:mod:`.shard_local`) run on."""
    distinct = (static_distinct_from_counts(dense_counts, P, n, dtype) if device_side
                else distinct_from_counts(dense_counts, P, dtype))
    return _normalized(distinct, unit, center, scale)


def _normalized(distinct: DistinctValues, unit: Tensor, center: Tensor, scale: Tensor | None
                ) -> tuple[DistinctValues, Tensor]:
    """:func:`normalized_distinct` of distinct values already found."""
    if scale is None:
        scale = scale_from_values(distinct, unit, center)
    distinct.values.mul_(unit / scale)
    return distinct, scale


def prepare(x: Tensor, normalization: Normalization | None, device_side: bool
             ) -> tuple[Tensor, CodeColumns, DistinctValues, Tensor, Tensor]:
    """Codes, columns, distinct values (normalised in place), centre and scale of ``x`` (P, n).
    Where :mod:`.native` takes ``x``, it is encoded and counted in one read
    (:func:`_prepare_marked`, as a batch of one)."""
    center, unit, scale = code_constants(x, normalization, device_side)
    marked = None if device_side else _prepare_marked([x], [center], unit, scale)
    if marked is not None:
        codes, columns, distinct, center, scale = marked
        return codes[0], columns[0], distinct, center, scale
    codes, columns = _encoded(x, center, unit, device_side)
    distinct, scale = normalized_distinct(columns.sum_per_code(), *x.shape, unit, center, scale,
                                          device_side, center.dtype)
    return codes, columns, distinct, center, scale


def _encoded(x: Tensor, center: Tensor, unit: Tensor, device_side: bool
             ) -> tuple[Tensor, CodeColumns]:
    """The codes of ``x`` and their columns (counted on first use), where
    :func:`_prepare_marked` does not take ``x``: by :mod:`.native`'s encoding where it takes
    ``x`` (with host reads), else by PyTorch ops."""
    codes = encode(x, center, unit, fused=not device_side)
    return codes, CodeColumns(codes, device_side)


def prepare_shared(xs: Sequence[Tensor], device_side: bool = True
                   ) -> tuple[list[Tensor], list[CodeColumns], DistinctValues, Tensor, Tensor]:
    """:func:`prepare` for a batch of tensors ``xs`` (P_t, n_t) with no given normalisation, in
    fewer operators: per tensor only what reads its weights (its centre, rough spread, codes
    and counts); the power-of-two units, the distinct-value layout, the scales and the
    normalisation once for every palette of the batch. ``device_side``: without host reads
    (the layout of ``min(max n_t, 65536)`` columns); else the compact layout of the widest
    palette's distinct values, with the codes encoded and counted by :mod:`.native`'s loop
    where it takes the tensors (:func:`prepare`'s rule). Returns each tensor's codes and
    columns, and for the batch's rows (sum P_t) the distinct values (normalised in place),
    centres and scales. The same values as :func:`prepare` tensor by tensor, up to the rounding
    of a palette's second moment summed over more (zero) padding columns."""
    centers = [x.mean(dim=1, keepdim=True) for x in xs]
    units = power_of_two_unit(_rough_stds(xs, centers, device_side))  # all palettes at once
    marked = None if device_side else _prepare_marked(xs, centers, units)
    if marked is not None:
        return marked
    codes, columns, counts = [], [], []
    row = 0
    for x, center in zip(xs, centers, strict=True):
        code, column = _encoded(x, center, units[row:row + x.shape[0]], device_side)
        codes.append(code)
        columns.append(column)
        counts.append(column.sum_per_code())
        row += x.shape[0]
    center = torch.cat(centers)
    distinct, scale = normalized_distinct(torch.cat(counts), row, max(x.shape[1] for x in xs),
                                          units, center, None, device_side, center.dtype)
    return codes, columns, distinct, center, scale


def _prepare_marked(xs: Sequence[Tensor], centers: Sequence[Tensor], units: Tensor,
                    scale: Tensor | None = None
                    ) -> tuple[list[Tensor], list[CodeColumns], DistinctValues, Tensor, Tensor
                               ] | None:
    """:func:`prepare_shared`'s codes, counts and distinct values by :mod:`.native`'s marked
    counting (:meth:`~.native.Kernels.encode_mark`): every palette of the batch counted into
    one int32 table, the codes seen marked in a bitmap, and the distinct values found from the
    marks: where the loops take every tensor, else ``None``. The same values as the int64
    counts and their walk; the distinct values also know their number per palette
    (:attr:`DistinctValues.occupied`, for the backward's sums, :meth:`~.native.Kernels.sums_at`).
    ``scale``: the palettes' given scales (else computed from the distinct values)."""
    loops = native.loops_for(*xs, units)
    if loops is None:
        return None
    rows = sum(x.shape[0] for x in xs)
    counts = torch.empty(rows * CODES, dtype=torch.int32, device="cpu")
    marks = torch.empty(rows * native.MARK_WORDS, dtype=torch.int64, device="cpu")
    inverse_units = 1.0 / units  # exact: powers of two
    codes, columns = [], []
    row = 0
    for x, center in zip(xs, centers, strict=True):
        P = x.shape[0]
        code = loops.encode_mark(x, center, inverse_units[row:row + P],
                                 counts[row * CODES:(row + P) * CODES],
                                 marks[row * native.MARK_WORDS:(row + P) * native.MARK_WORDS])
        if code is None:
            return None
        codes.append(code)
        columns.append(CodeColumns(code))
        row += P
    found = loops.marked_distinct(counts, marks, rows)
    if found is None:
        return None
    distinct = _from_loop(rows, *found)
    center = centers[0] if len(centers) == 1 else torch.cat(centers)
    distinct, scale = _normalized(distinct, units, center, scale)
    return codes, columns, distinct, center, scale


def _same(want: Tensor | None, got: Tensor | None) -> bool:
    """Whether a loop's result is the PyTorch ops' bit for bit (both ``None``: a field neither
    has). Float16 codes are compared by their bits, so NaN payloads count; in float32 results a
    NaN only has to be one (PyTorch's own conversions of a NaN code do not all keep its
    payload), every other value bit for bit."""
    if want is None or got is None:
        return want is None and got is None
    if want.dtype != got.dtype or want.shape != got.shape:
        return False
    if want.dtype == torch.float16:
        return torch.equal(want.view(torch.int16), got.view(torch.int16))
    if want.dtype == torch.float32:
        nan = want.isnan()
        return torch.equal(nan, got.isnan()) and torch.equal(
            want.masked_fill(nan, 0.0).view(torch.int32),
            got.masked_fill(nan, 0.0).view(torch.int32))
    return torch.equal(want, got)


def _check_marked(loaded: native.Kernels, x: Tensor, center: Tensor, inverse_unit: Tensor,
                  finite_codes: Tensor, g: Tensor,
                  checks: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Adds to ``checks`` the marked counting (into a table of garbage), the sums at the
    distinct codes and the spread of a per-value table (:func:`_prepare_marked`), each beside
    what the PyTorch ops give."""
    P = x.shape[0]
    counts = torch.full((P * CODES,), 7, dtype=torch.int32, device="cpu")  # overwritten
    marks = torch.full((P * native.MARK_WORDS,), -1, dtype=torch.int64, device="cpu")
    codes = loaded.encode_mark(x, center, inverse_unit, counts, marks)
    want_codes = encode(x, center, 1.0 / inverse_unit, fused=False)
    checks["marked codes"] = (want_codes, codes)
    checks["marked counts"] = (CodeColumns(want_codes, fused=False).sum_per_code(),
                               None if codes is None else counts.to(torch.int64))
    want = _distinct_by_ops(CodeColumns(finite_codes, fused=False).sum_per_code(), P,
                            torch.float32)
    found = loaded.encode_mark(torch.where(x.isnan(), 0.0, x), center, inverse_unit, counts,
                               marks)
    tables = None if found is None else loaded.marked_distinct(counts, marks, P)
    got = None if tables is None else _from_loop(P, *tables[:5])  # occupied: the ops' None
    for field in DistinctValues._fields:
        checks[f"marked distinct {field}"] = (getattr(want, field),
                                              None if got is None else getattr(got, field))
    sums = want.from_dense(CodeColumns(finite_codes, fused=False).sum_per_code(g))
    assert want.ids is not None and want.rows is not None and want.cols is not None
    scratch = torch.empty(P * CODES, dtype=torch.float32, device="cpu")
    got_sums = loaded.sums_at(finite_codes, g, scratch, want.ids, want.rows,
                              want.cols, slice(0, want.ids.numel()), 0, torch.zeros_like(sums))
    checks["sums at the distinct codes"] = (sums, got_sums)
    spread = loaded.spread(sums, want.ids, want.rows, want.cols)
    checks["spread"] = (sums[want.rows, want.cols], None if spread is None else spread[want.ids])


def _check_nearest(loaded: native.Kernels, x: Tensor,
                   checks: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Adds to ``checks`` the nearest-centroid loop beside the PyTorch ops, on weights with
    NaN, infinities, overflow and ties: points midway between two centroids, and a centroid
    given twice (the lower index wins)."""
    centroids = torch.tensor([[0.5, -1.0, 2.0, 0.5, -0.25], [3.0, -3.0, 0.0, 1.0, 2.0]],
                             dtype=torch.float32, device="cpu")
    points = x.clone()
    points[1, :6] = torch.tensor([0.5, -0.625, float("inf"), float("-inf"), 1.5, 2.5],
                                 dtype=torch.float32, device="cpu")
    sorted_c, order = torch.sort(centroids, dim=-1, stable=True)
    checks["nearest centroid"] = (nearest_1d_by_ops(points, sorted_c, order),
                                  loaded.nearest_sorted(points, sorted_c, order))


def _check_program(loaded: native.Kernels,
                   checks: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Adds to ``checks`` the exact 1-D k-means program's loop beside its PyTorch ops
    (:func:`~.optimal1d.choices_by_ops`) on two palettes of 40 weighted bins, with ties
    (repeated values) and bins of weight 0, at 5 runs: every entry of the table of choices."""
    generator = torch.Generator().manual_seed(1)
    cpu = {"dtype": torch.float64, "device": "cpu"}  # whatever the defaults
    values = torch.randn(2, 40, generator=generator, **cpu).mul_(4).round_().sort(1).values
    weights = torch.rand(2, 40, generator=generator, **cpu)
    weights[:, ::7] = 0.0
    sums = torch.stack((weights, weights * values, weights * values.square())).cumsum(2)
    prefix = torch.cat((sums.new_zeros(3, 2, 1), sums), 2)
    checks["k-means program"] = (choices_by_ops(prefix, 5), choices_by_loop(loaded, prefix, 5))


def _check_grid(loaded: native.Kernels,
                checks: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Adds to ``checks`` the grid loop of ``average_bits``' estimate beside its PyTorch ops
    (:mod:`.value_grid`): counts and sums per cell, and a sensitivity's sums (none, float32,
    float64), on two palettes of a grid of 16 cells a side (33 cells): 700 values in pieces
    of 64 columns (more columns than cells: the loop zeroes whole tables per piece), and the
    first 160 in pieces of 16 (fewer: it keeps a list of the cells each piece touched, the
    path of every call with 128 palettes or more), with values on the cells' edges and
    midway between cells, -0, a subnormal and repeats."""
    generator = torch.Generator().manual_seed(2)
    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever the defaults
    grid = 16
    unit = torch.tensor([[4.0], [2.0**-10]], **cpu)
    x = torch.rand(2, 700, generator=generator, **cpu).mul_(2).sub_(1)
    x[1, 100:] = x[1, 100:].mul_(1024).round_().div_(1024)  # few distinct values: repeats
    x[0, :8] = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0**-130, 1.5 / grid, -2.5 / grid,
                             0.5 / grid], **cpu)
    x.mul_(unit)
    f = {dtype: torch.rand(2, 700, generator=generator, dtype=dtype, device="cpu")
         for dtype in (torch.float32, torch.float64)}
    for columns, width in ((64, 700), (16, 160)):  # the narrow pieces on fewer columns
        x = x[:, :width].contiguous()
        f = {dtype: t[:, :width].contiguous() for dtype, t in f.items()}
        cells, offsets, counts, sums = cells_by_ops(x, unit, grid, columns)
        got = loaded.grid_counts(x, unit.reshape(-1), grid, columns)
        checks[f"grid counts ({columns} columns)"] = (counts, None if got is None else got[0])
        checks[f"grid sums ({columns} columns)"] = (sums, None if got is None else got[1])
        for dtype in (None, torch.float32, torch.float64):
            weights = None if dtype is None else f[dtype]
            want = cell_sums_by_ops(cells, offsets, weights, grid, columns)
            found = loaded.grid_sums(x, unit.reshape(-1), grid, columns, weights)
            for name, a, b in zip(("f", "f r", "f r^2"), want, found or (None,) * 3,
                                  strict=True):
                checks[f"grid sums of {name} ({dtype}, {columns} columns)"] = (a, b)


def _fused_disagreement(loaded: native.Kernels) -> str | None:
    """Compares every native loop with the PyTorch ops on values that exercise float16's
    rounding, subnormals, overflow, NaN payloads and repeated codes; returns what differs, if
    anything. The backward's look-up is tried with and without a fused multiply-add, and the
    one that rounds as this machine's ``addcmul_`` is kept (PyTorch's vectorised kernels fuse
    it, its scalar ones do not). Every tensor here is float32 on the CPU, whatever the
    process's default dtype and device."""
    cpu = {"dtype": torch.float32, "device": "cpu"}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4099, generator=generator, **cpu)
    x[0, :7] = torch.tensor([7e4, -7e4, 0.0, 1e-9, 2.0**-24 * 3, 0.5 + 2.0**-12, 0.0], **cpu)
    x.view(torch.int32)[0, 6] = 0x7FA12345  # a NaN with a payload
    center = torch.tensor([[0.0], [0.25]], **cpu)
    unit = torch.tensor([[1.0], [2.0**-3]], **cpu)
    inverse_unit = 1.0 / unit
    codes = encode(x, center, unit, fused=False)
    finite = torch.where(x.isnan(), 0.0, x)
    columns = CodeColumns(codes, fused=False)
    g = torch.randn(2, 4099, generator=generator, **cpu)
    a = torch.randn(2 * CODES, generator=generator, **cpu)
    b = torch.randn(2 * CODES, generator=generator, **cpu)
    finite_codes = encode(finite, center, unit, fused=False)
    finite_columns = CodeColumns(finite_codes, fused=False)
    checks = {
        "codes alone": (codes, loaded.encode(x, center, inverse_unit)),
        "counts from codes": (columns.sum_per_code(), loaded.count(codes)),
        "sums per code": (finite_columns.sum_per_code(g),
                          loaded.sum_per_code(finite_codes, g)),
        "look-up": (finite_columns.look_up(a),
                    loaded.look_up(finite_codes, a, torch.empty(2, 4099, **cpu))),
    }
    for P, counts in ((2, columns.sum_per_code()), (1, columns.sum_per_code()[CODES:])):
        want_distinct = _distinct_by_ops(counts, P, torch.float32)
        got_distinct = _distinct_by_loop(loaded, counts, P)
        for field in DistinctValues._fields:
            checks[f"distinct {field} (P={P})"] = (
                getattr(want_distinct, field),
                None if got_distinct is None else getattr(got_distinct, field))
    _check_marked(loaded, x, center, inverse_unit, finite_codes, g, checks)
    _check_nearest(loaded, x, checks)
    _check_program(loaded, checks)
    _check_grid(loaded, checks)
    differ = [name for name, (want, got) in checks.items() if not _same(want, got)]
    want = finite_columns.look_up(a, factor=(b, g))
    for fused in (True, False):
        loaded.fused_multiply_add = fused
        got = loaded.look_up_affine(finite_codes, a, b, g, torch.empty(2, 4099, **cpu))
        if got is not None and torch.equal(want, got):
            break
    else:
        differ.append("affine look-up")
    return None if not differ else f"its results differ from PyTorch's in: {', '.join(differ)}"


native.set_check(_fused_disagreement)
