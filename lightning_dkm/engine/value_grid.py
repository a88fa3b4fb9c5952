"""The even grid of ``average_bits``' estimate, by PyTorch ops.

:func:`~lightning_dkm.model.bit_budget.plan_widths` estimates each tensor's k-means error at
every width from its scalar palettes' values ``x / unit`` rounded to the multiples of
``1 / grid`` (``2 * grid + 1`` cells per palette over ``[-1, 1]``, palette after palette). Two
passes over the weights give what the estimate needs: per cell the number of values and
their sum (:func:`cells_by_ops`), and per cell the sums of a sensitivity ``f`` and of ``f r``
(``r`` a value's offset from its cell's value), with per palette that of ``f r^2``
(:func:`cell_sums_by_ops`). Each pass runs a piece of ``columns`` columns at a time and adds
each piece's ``bincount`` into float64 tables.

:func:`cell_counts` and :func:`cell_sums` run :mod:`.native`'s ``dkm_grid`` loop
(``Kernels.grid_counts`` and ``Kernels.grid_sums``) where it is built: the same tables bit for
bit in one read of ``x``, keeping no cell or offset per value. Elsewhere they run the PyTorch
ops (:func:`cells_by_ops`, :func:`cell_sums_by_ops`), whose cells and offsets the sums reuse.
Both live here, below the engine's load check (:mod:`.float16_codes`), so that the check
compares the loop with these ops when the library first loads, as it does every other loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .numerics import chunks

__all__ = ["Cells", "cell_counts", "cell_sums", "cell_sums_by_ops", "cells_by_ops", "pieces"]

#: Each value's cell (int32) and its offset from the cell's value (float32), both ``(P, n)``.
Cells = tuple[Tensor, Tensor]


def cell_counts(x: Tensor, unit: Tensor, grid: int, columns: int
                ) -> tuple[Tensor, Tensor, Cells | None]:
    """Per cell the number of values of ``x / unit`` (int64) and their sum (float64), and
    where the PyTorch ops found them, each value's cell and offset (``None`` where the native
    loop did: it keeps none). ``x`` ``(P, n)`` float32, ``unit`` one power of two per palette
    (``(P,)`` or ``(P, 1)``), at least each palette's largest ``|x|``."""
    loops = native.loops_for(x)
    counted = None if loops is None else loops.grid_counts(
        x, unit.reshape(-1).contiguous(), grid, columns)
    if counted is not None:
        return counted[0], counted[1], None
    cells, offsets, counts, sums = cells_by_ops(x, unit.reshape(-1, 1), grid, columns)
    return counts, sums, (cells, offsets)


def cell_sums(x: Tensor, unit: Tensor, grid: int, columns: int, f: Tensor | None,
              cells: Cells | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cell_sums_by_ops` of the values ``x / unit`` (as :func:`cell_counts`) and the
    sensitivity ``f``: by the native loop where it takes them, else by the PyTorch ops on
    ``cells`` (those :func:`cell_counts` gave; found again where ``None``)."""
    loops = native.loops_for(x)
    got = None if loops is None else loops.grid_sums(
        x, unit.reshape(-1).contiguous(), grid, columns, f)
    if got is not None:
        return got
    if cells is None:
        cells = cells_by_ops(x, unit.reshape(-1, 1), grid, columns)[:2]
    return cell_sums_by_ops(*cells, f, grid, columns)


def pieces(shape: torch.Size | tuple[int, int], columns: int) -> list[tuple[slice, slice]]:
    """Column slices of a ``(P, n)`` tensor, ``columns`` columns each (the last one fewer):
    the passes over the weights run on pieces, not whole tensors."""
    _, n = shape
    return [(slice(None), part) for part in chunks(n, columns)]


def cells_by_ops(x: Tensor, unit: Tensor, grid: int, columns: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Palettes ``x / unit`` (``x`` ``(P, n)`` float32, ``unit`` ``(P, 1)`` powers of two, at
    least each palette's largest ``|x|``) on the grid of multiples of ``1 / grid``: each
    value's cell (``(P, n)`` int32, palette ``p``'s cells from ``p * (2 * grid + 1)``;
    ``bincount`` is 3x faster on int32 than on int64) and its offset from the cell's value
    (``(P, n)`` float32, exact: ``x * grid`` and its rounding differ by at most 1/2,
    Sterbenz's lemma), and per cell the count (int64) and the sum of the values as they are
    (float64), each piece's ``bincount`` added in turn. The buffers of a piece are reused from
    piece to piece."""
    P, n = x.shape
    size = 2 * grid + 1
    cells = torch.empty(P, n, dtype=torch.int32, device="cpu")
    offsets = torch.empty(P, n, device="cpu")
    counts = torch.zeros(P * size, dtype=torch.int64, device="cpu")
    sums = torch.zeros(P * size, dtype=torch.float64, device="cpu")
    base = (torch.arange(P, dtype=torch.int32, device="cpu") * size + grid).unsqueeze(1)
    parts = pieces(x.shape, columns)
    width = parts[0][1].stop - parts[0][1].start if parts else 0
    values, scaled = torch.empty(P, width, device="cpu"), torch.empty(P, width, device="cpu")
    wide = torch.empty(P, width, dtype=torch.float64, device="cpu")
    for piece in parts:
        m = min(n, piece[1].stop) - piece[1].start
        v, t, d = values[:, :m], scaled[:, :m], wide[:, :m]
        torch.div(x[piece], unit, out=v)  # exact: a power of two
        torch.mul(v, grid, out=t)
        offsets[piece] = t
        t.round_()
        offsets[piece].sub_(t).div_(grid)
        cell = cells[piece]
        cell.copy_(t).add_(base)  # in int32: float32 would round cells past 2**24
        cell = cell.reshape(-1)
        counts += torch.bincount(cell, minlength=P * size)
        sums += torch.bincount(cell, d.copy_(v).reshape(-1), P * size)
    return cells, offsets, counts, sums


def cell_sums_by_ops(cells: Tensor, offsets: Tensor, f: Tensor | None, grid: int, columns: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """For the ``cells`` and ``offsets`` ``r`` of :func:`cells_by_ops` and a sensitivity ``f``
    (``(P, n)`` float32 or float64, read only; ``None``: 1 everywhere): per cell the sums of
    ``f`` and of ``f r`` (each ``(P * (2 * grid + 1),)``) and per palette that of ``f r^2``
    (``(P,)``), all float64, each piece's ``bincount`` added in turn (the last per palette in
    index order, as the loop adds, not ``linalg.vecdot``'s order)."""
    size = (2 * grid + 1) * offsets.shape[0]
    P = offsets.shape[0]
    total = torch.zeros(size, dtype=torch.float64, device="cpu")
    first = torch.zeros_like(total)
    second = torch.zeros(P, dtype=torch.float64, device="cpu")
    for piece in pieces(offsets.shape, columns):
        cell = cells[piece].reshape(-1)
        r = offsets[piece].double()
        if f is None:
            total += torch.bincount(cell, minlength=size)
            fr = r
        else:
            weight = f[piece].double()  # f itself where float64: not written
            total += torch.bincount(cell, weight.reshape(-1), size)
            fr = weight * r
        first += torch.bincount(cell, fr.reshape(-1), size)
        palette = torch.arange(P, device="cpu").repeat_interleave(r.shape[1])
        second += torch.bincount(palette, (fr * r).reshape(-1), P)
    return total, first, second
