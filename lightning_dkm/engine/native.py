"""Fused CPU loops for the ``"unique"`` DKM step's passes over every weight (#22).

With PyTorch ops, each of the step's O(n) passes is several (:mod:`.float16_codes`): the
codes are a subtraction and a multiplication into float32 scratch and a conversion to float16;
counting converts them to int32 table columns and runs ``bincount`` (which reads its input's
minimum and maximum first); the backward's gradient is an ``index_select`` and an
``addcmul_``. Here each pass is one loop of ``csrc/dkm_codes.c`` over the weights: encode
and count in one read of the weights, look-up, sum per code, and the backward's
``a[code] + b[code] g``; and one more compacts the per-code counts into the distinct values
(what ``nonzero`` and a dozen indexing ops did, two reads of the counts). They round as the
ops they replace do (bit for bit the same codes, counts, sums, outputs, gradients and
distinct values: ``tests/test_native.py``), and take 2.3-4x less time on one thread
(``benchmarks/perf_passes.py``; ``docs/benchmarks.md``, "The passes as C loops"). A batch of
tensors (:func:`~.float16_codes.prepare_shared`) counts into one int32 table and a bitmap of
the codes seen (``encode_mark``), finds the distinct values from the bitmap
(``marked_distinct``), and in the backward sums each tensor's gradient at its distinct codes
only (``sums_at``); per-value tables reach the codes by ``spread``. ``nearest_sorted`` is
:func:`~.kmeans._nearest_1d`'s search (the nearest centroid of scalar weights).
``grid_counts`` and ``grid_sums`` are ``average_bits``' passes over the weights
(:mod:`.value_grid`: each value's cell of a grid, counted and summed, and a sensitivity
summed per cell), bit for bit its ``bincount`` per piece; and
``optimal_choices`` runs the exact 1-D k-means program of :mod:`.optimal1d` (its choices bit
for bit those of its vectorised PyTorch ops).

**The weighted core's backward** (:mod:`.weighted`) has two loops here too, for scalar points
with counts (every ``"unique"`` batch): a round back (``round_backward``) and the last round's
local part with the final centroids' gradient (``local_backward``), each one read of the
round's attention where the PyTorch ops make some ten passes over it and its temporaries.
Their sums over the points run in their own order, so their gradients are the PyTorch ops'
up to summation order (within float32 rounding of the float64 gradient, as the ops are:
``tests/test_native.py``), not bit for bit; the forward and every pass over the weights are.
Where a call has at least :data:`PARALLEL_GRAIN` attention entries per thread, its points are
cut into ranges over torch's intra-op threads (``torch.get_num_threads()``; a ``ctypes`` call
releases the GIL), as the PyTorch ops they replace spread over them.

**How it is built.** On first use, with the machine's C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``): one file, no Python or PyTorch headers, about 2 s (0.02 s to load and check
once built), into a
cache directory (``$LIGHTNING_DKM_CACHE``, else ``$XDG_CACHE_HOME/lightning_dkm`` or
``~/.cache/lightning_dkm``; a fresh temporary one where that cannot be created) under a name
hashed from the source, the compiler, the flags and the architecture, so a machine builds it
once; processes that build it at once (DDP ranks) each write their own file and rename it into
place. It is loaded with :mod:`ctypes` and checked against the PyTorch ops on a few values
before it is used (:func:`loops_for`, with :func:`~.float16_codes._fused_disagreement`; the
core's loops at their first use,
against the core's own PyTorch path to a tolerance, and where they disagree only they are
turned off: :func:`~.weighted.check_core_loops`); the check also finds whether this
machine's ``addcmul_`` fuses its multiply-add (PyTorch's vectorised kernels do, its scalar
ones do not), and the backward's look-up rounds the same way. Nothing is built for tensors
the loops cannot take (:func:`takes`: an accelerator, ``meta``, a tracer's tensors), and each
loop checks its arguments' dtypes and shapes before C sees a pointer.

**When it is not used.** Without a compiler, where the build or the check fails, or with
``LIGHTNING_DKM_NATIVE=0``, every pass runs as PyTorch ops (the same values; the reason is
logged once at INFO level). ``LIGHTNING_DKM_NATIVE=1`` makes such a failure an error (for
benchmarks and CI). The loops take float32 CPU tensors in contiguous memory only; anything
else (float64 weights, an accelerator, the layout without host reads under ``torch.compile``)
takes the PyTorch ops as before. Encoding, counting and summing per code run on one thread, as
``bincount`` does in PyTorch; the look-ups cut a tensor of at least twice
:data:`LOOK_UP_GRAIN` weights into ranges over torch's intra-op threads (each weight's value is
its own, so bit for bit the same), and the core's loops a large call's points (above). With
torch's two threads on a 2-core machine the fit still gains from them (``docs/benchmarks.md``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Kernels", "build", "build_failure", "forget", "kernels", "takes", "turned_off"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "dkm_codes.c"
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")
_CODES = 1 << 16
_ENV = "LIGHTNING_DKM_NATIVE"
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "dkm_encode": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER),
    "dkm_count": (_POINTER, _SIZE, _SIZE, _POINTER),
    "dkm_sum_per_code": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER),
    "dkm_look_up": (_POINTER, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER),
    "dkm_look_up_affine": (_POINTER, _SIZE, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER,
                           _POINTER, ctypes.c_int),
    "dkm_occupied": (_POINTER, _SIZE, _POINTER),
    "dkm_distinct": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER),
    "dkm_encode_mark": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER,
                        _POINTER),
    "dkm_marked_occupied": (_POINTER, _SIZE, _POINTER),
    "dkm_marked_distinct": (_POINTER, _POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER,
                            _POINTER, _POINTER),
    "dkm_sums_at": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER,
                    _SIZE, _SIZE, _SIZE, _SIZE, _SIZE, _POINTER),
    "dkm_spread": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _SIZE, _POINTER),
    "dkm_nearest_sorted": (_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE, _POINTER),
    "dkm_round_backward": (_SIZE, _SIZE, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER, _SIZE,
                           _POINTER, _POINTER, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER,
                           _POINTER, _SIZE, _POINTER),
    "dkm_local_backward": (_SIZE, _SIZE, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER, _SIZE,
                           _POINTER, _SIZE, _POINTER, _POINTER, _POINTER, _POINTER, _SIZE,
                           _POINTER, _POINTER),
    "dkm_grid": (_POINTER, _SIZE, _SIZE, _POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER,
                 ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER),
    "dkm_optimal_choices": (_POINTER, _SIZE, _SIZE, _SIZE, ctypes.c_double, _POINTER, _POINTER,
                            _POINTER, _POINTER),
}
#: The loops that return 0, or 1 where their indices would leave their tables (nothing written;
#: the grid's loops: a value outside the grid, some cells already added into).
_RETURN_STATUS = frozenset({"dkm_sums_at", "dkm_spread", "dkm_grid"})
#: The sensitivity types :meth:`Kernels.grid_sums` takes (``dkm_grid``'s ``f_type``).
_GRID_WEIGHTS = {None: 0, torch.float32: 1, torch.float64: 2}
#: Words of a palette's bitmap of the codes seen (``MARK_WORDS`` in the C source).
MARK_WORDS = _CODES // 64
#: The most centroids the core's loops take (8 bits; ``CORE_MAX_K`` in the C source).
CORE_MAX_K = 256


class Kernels:
    """The loaded loops, called on tensors. Each method checks its arguments (CPU tensors in
    contiguous memory, float32 weights and tables, float16 codes ``(P, n)``, tables of
    ``P * 65536`` entries, ``(P, n)`` weights and results) and returns ``None`` where they do
    not fit, so that the caller runs the PyTorch ops instead; C never sees memory of another
    size or type than it expects."""

    def __init__(self, library: ctypes.CDLL, fused_multiply_add: bool = True) -> None:
        self._library = library
        self.fused_multiply_add = fused_multiply_add
        #: whether the core's backward loops agree with the PyTorch ops on this machine
        #: (checked at their first use, :func:`~.weighted.check_core_loops`); where not, they
        #: return ``None`` and the ops run, while the passes over the weights keep their loops
        self.core_agrees = True
        self.core_checked = False
        for name, arguments in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = arguments
            function.restype = ctypes.c_int if name in _RETURN_STATUS else None

    def refuse_core(self, why: str) -> None:
        """The core's loops disagree with the PyTorch ops (``why``): they are not used from
        now on (logged once); with ``LIGHTNING_DKM_NATIVE=1`` an error instead."""
        if os.environ.get(_ENV) == "1":
            raise RuntimeError(f"{_ENV}=1, but the DKM core's backward loops differ from the "
                               f"PyTorch ops: {why}")
        log.info("lightning_dkm: the DKM core's backward uses PyTorch ops (its loops differ "
                 "from them: %s)", why)
        self.core_agrees = False

    def encode(self, x: Tensor, center: Tensor, inverse_unit: Tensor) -> Tensor | None:
        """The float16 codes ``(x - center) * inverse_unit`` of ``x`` (P, n)."""
        if not _constants_fit(x, center, inverse_unit):
            return None
        P, n = x.shape
        codes = torch.empty(P, n, dtype=torch.float16, device="cpu")
        self._library.dkm_encode(x.data_ptr(), P, n, center.data_ptr(), inverse_unit.data_ptr(),
                                 codes.data_ptr())
        return codes

    def count(self, codes: Tensor) -> Tensor | None:
        """The number of weights per code (P * 65536,) int64."""
        if not _fit(codes, torch.float16, 2):
            return None
        P, n = codes.shape
        counts = torch.zeros(P * _CODES, dtype=torch.int64, device="cpu")
        self._library.dkm_count(codes.data_ptr(), P, n, counts.data_ptr())
        return counts

    def sum_per_code(self, codes: Tensor, weights: Tensor) -> Tensor | None:
        """The sum of ``weights`` (P, n) over the weights of each code (P * 65536,), added in
        index order (``bincount``'s sums, bit for bit)."""
        if not (_fit(codes, torch.float16, 2) and _fit(weights, torch.float32, 2)
                and weights.shape == codes.shape):
            return None
        P, n = codes.shape
        sums = torch.zeros(P * _CODES, dtype=torch.float32, device="cpu")
        self._library.dkm_sum_per_code(codes.data_ptr(), P, n, weights.data_ptr(),
                                       sums.data_ptr())
        return sums

    def look_up(self, codes: Tensor, table: Tensor, out: Tensor) -> Tensor | None:
        """``out[p, i] = table[p * 65536 + code]`` (``out`` (P, n) float32)."""
        if not (_tables_fit(codes, out, table)):
            return None
        P, n = codes.shape
        ranges = _weight_ranges(n)

        def run(i: int) -> None:
            s = ranges[i]
            self._library.dkm_look_up(_at(codes, s.start), P, s.stop - s.start, n,
                                      table.data_ptr(), _at(out, s.start))

        _in_parallel(run, len(ranges))
        return out

    def look_up_affine(self, codes: Tensor, a: Tensor, b: Tensor, g: Tensor, out: Tensor
                       ) -> Tensor | None:
        """``out = a[code] + b[code] * g`` per weight, rounded as ``index_select`` then
        ``addcmul_`` round on this machine (one fused multiply-add where PyTorch's kernels
        fuse it, :attr:`fused_multiply_add`)."""
        if not (_tables_fit(codes, out, a, b) and _fit(g, torch.float32, 2)
                and g.shape == codes.shape):
            return None
        P, n = codes.shape
        ranges = _weight_ranges(n)
        fused = int(self.fused_multiply_add)

        def run(i: int) -> None:
            s = ranges[i]
            self._library.dkm_look_up_affine(_at(codes, s.start), P, s.stop - s.start, n,
                                             a.data_ptr(), b.data_ptr(), _at(g, s.start),
                                             _at(out, s.start), fused)

        _in_parallel(run, len(ranges))
        return out

    def distinct(self, dense_counts: Tensor, P: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
        """The occupied codes of the per-code counts ``(P * 65536,)`` int64, in code order:
        their flat ids, palettes and ranks in their palette (each (U,) int64), and (P, width)
        tables of their float16 bit patterns (int16) and counts (float32), zero after a
        palette's last, ``width`` the most any palette has: what ``nonzero`` and the indexing
        of :func:`~.float16_codes.distinct_from_counts` give, in two reads of the counts."""
        if not (_fit(dense_counts, torch.int64, 1) and dense_counts.numel() == P * _CODES):
            return None
        ptr = dense_counts.data_ptr()
        return self._compacted(
            P, lambda occupied: self._library.dkm_occupied(ptr, P, occupied),
            lambda width, *out: self._library.dkm_distinct(ptr, P, width, *out))[:5]

    @staticmethod
    def _compacted(P: int, count: Callable[[int], None], compact: Callable[..., None]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]]:
        """The tables of :meth:`distinct` and :meth:`marked_distinct`, and the distinct codes
        per palette: ``count(occupied)`` writes those (read back to size the tables), then
        ``compact(width, ids, rows, cols, patterns, counts)`` fills the tables (addresses)."""
        occupied = torch.empty(P, dtype=torch.int64, device="cpu")
        count(occupied.data_ptr())
        per_palette = occupied.tolist()
        total, width = sum(per_palette), max(per_palette, default=0)
        ids, rows, cols = (torch.empty(total, dtype=torch.int64, device="cpu") for _ in range(3))
        patterns = torch.empty(P, width, dtype=torch.int16, device="cpu")
        counts = torch.empty(P, width, dtype=torch.float32, device="cpu")
        compact(width, *(t.data_ptr() for t in (ids, rows, cols, patterns, counts)))
        return ids, rows, cols, patterns, counts, per_palette

    def encode_mark(self, x: Tensor, center: Tensor, inverse_unit: Tensor, counts: Tensor,
                    marks: Tensor) -> Tensor | None:
        """:meth:`encode`, counting each palette's codes into ``counts`` (P * 65536,) int32
        and marking the codes seen in ``marks`` (P * :data:`MARK_WORDS`,) int64, a bit per
        code (both written here, whatever they held): :meth:`marked_distinct` then reads the
        counts of those codes only. Fewer than 2**31 weights per palette (int32 counts)."""
        if not (_constants_fit(x, center, inverse_unit) and _fit(counts, torch.int32, 1)
                and _fit(marks, torch.int64, 1)):
            return None
        P, n = x.shape
        if counts.numel() != P * _CODES or marks.numel() != P * MARK_WORDS or n >= 1 << 31:
            return None
        codes = torch.empty(P, n, dtype=torch.float16, device="cpu")
        self._library.dkm_encode_mark(x.data_ptr(), P, n, center.data_ptr(),
                                      inverse_unit.data_ptr(), codes.data_ptr(),
                                      counts.data_ptr(), marks.data_ptr())
        return codes

    def marked_distinct(self, counts: Tensor, marks: Tensor, P: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]] | None:
        """:meth:`distinct` of the codes :meth:`encode_mark` counted and marked, and the
        number of distinct codes of each palette (a list: read back to size the tables)."""
        if not (_fit(counts, torch.int32, 1) and counts.numel() == P * _CODES
                and _fit(marks, torch.int64, 1) and marks.numel() == P * MARK_WORDS):
            return None
        table, bits = counts.data_ptr(), marks.data_ptr()
        return self._compacted(
            P, lambda occupied: self._library.dkm_marked_occupied(bits, P, occupied),
            lambda width, *out: self._library.dkm_marked_distinct(table, bits, P, width, *out))

    def sums_at(self, codes: Tensor, weights: Tensor, scratch: Tensor, ids: Tensor,
                rows: Tensor, cols: Tensor, values: slice, row0: int, out: Tensor
                ) -> Tensor | None:
        """The sums of ``weights`` (P, n) over the weights of each code, written to ``out``
        (R, width) at ``(rows[v], cols[v])`` for the distinct codes ``v`` in ``values`` (flat
        ids ``ids[v]``; a tensor's palettes being rows ``row0 .. row0 + P - 1`` of a batch):
        :meth:`sum_per_code` followed by the pick of those codes, but zeroing, adding into and
        reading only their entries of ``scratch`` (at least P * 65536 float32)."""
        if not (_fit(codes, torch.float16, 2) and _fit(weights, torch.float32, 2)
                and weights.shape == codes.shape and _fit(scratch, torch.float32, 1)
                and _fit(out, torch.float32, 2) and all(_fit(t, torch.int64, 1) for t in
                                                       (ids, rows, cols))):
            return None
        P, n = codes.shape
        if not (isinstance(values.start, int) and isinstance(values.stop, int)
                and values.step in (None, 1) and isinstance(row0, int)):
            return None
        if (scratch.numel() < P * _CODES or not ids.numel() == rows.numel() == cols.numel()
                or not 0 <= values.start <= values.stop <= ids.numel()
                or not 0 <= row0 < (1 << 62) // _CODES - P):
            return None
        status = self._library.dkm_sums_at(
            codes.data_ptr(), P, n, weights.data_ptr(), scratch.data_ptr(), ids.data_ptr(),
            rows.data_ptr(), cols.data_ptr(), values.start, values.stop, row0, out.shape[0],
            out.shape[1], out.data_ptr())
        return out if status == 0 else None

    def spread(self, compact: Tensor, ids: Tensor, rows: Tensor, cols: Tensor
               ) -> Tensor | None:
        """``compact`` (R, width) per distinct value -> (R * 65536,) per code, the entry of
        code ``ids[v]`` from ``(rows[v], cols[v])``; the entries of other codes are left
        unset (no weight reads them): what ``scatter_`` of the picked values gives."""
        if not (_fit(compact, torch.float32, 2) and all(_fit(t, torch.int64, 1) for t in
                                                         (ids, rows, cols))
                and ids.numel() == rows.numel() == cols.numel()):
            return None
        R, width = compact.shape
        dense = torch.empty(R * _CODES, dtype=torch.float32, device="cpu")
        status = self._library.dkm_spread(compact.data_ptr(), R, width, ids.data_ptr(),
                                          rows.data_ptr(), cols.data_ptr(), ids.numel(),
                                          dense.data_ptr())
        return dense if status == 0 else None

    def nearest_sorted(self, x: Tensor, sorted_c: Tensor, order: Tensor) -> Tensor | None:
        """The index (P, n) int64 of each weight's nearest centroid (ties to the lower index)
        for weights ``x`` (P, n) float32 and each palette's centroids sorted ascending
        ``sorted_c`` (P, k) with their indices ``order`` (P, k) int64: what
        :func:`~.kmeans._nearest_1d`'s PyTorch ops give, in one pass."""
        if not (_fit(x, torch.float32, 2) and _fit(sorted_c, torch.float32, 2)
                and _fit(order, torch.int64, 2) and order.shape == sorted_c.shape
                and sorted_c.shape[0] == x.shape[0] and sorted_c.shape[1] > 0):
            return None
        P, n = x.shape
        idx = torch.empty(P, n, dtype=torch.int64, device="cpu")
        self._library.dkm_nearest_sorted(x.data_ptr(), P, n, sorted_c.data_ptr(),
                                         order.data_ptr(), sorted_c.shape[1], idx.data_ptr())
        return idx

    def grid_counts(self, x: Tensor, unit: Tensor, grid: int, piece: int
                    ) -> tuple[Tensor, Tensor] | None:
        """Per cell of each palette's grid (``2 * grid + 1`` cells of width ``1 / grid``, a
        power of two, over ``[-1, 1]``, palette after palette) of the values ``x / unit``
        (``x`` (P, n) float32, ``unit`` one float32 power of two per palette, at least each
        palette's largest ``|x|``): the number of values (int64) and their sum (float64), the sums
        added sequentially a ``piece`` of columns at a time (``average_bits``' estimate:
        what :func:`~.value_grid.cells_by_ops`' ``bincount`` of each piece
        gives, bit for bit), in one read of ``x`` and without its cells or offsets."""
        if not self._grid_fit(x, unit, grid, piece):
            return None
        P = x.shape[0]
        counts = torch.zeros(P * (2 * grid + 1), dtype=torch.int64, device="cpu")
        sums = torch.zeros(P * (2 * grid + 1), dtype=torch.float64, device="cpu")
        ok = self._grid(x, unit, grid, piece, counts=counts, sums=sums)
        return (counts, sums) if ok else None

    def grid_sums(self, x: Tensor, unit: Tensor, grid: int, piece: int, f: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor] | None:
        """For the grid of :meth:`grid_counts` and a sensitivity ``f`` (P, n) float32 or
        float64 (``None``: 1 everywhere), with ``r`` each value's offset from its cell's
        (float32, exact), per cell the sums of ``f`` and ``f r`` (each (P * size,)) and per
        palette that of ``f r^2`` ((P,)), all float64 and sequential per piece as
        :meth:`grid_counts` (what :func:`~.value_grid.cell_sums_by_ops`' ``bincount`` of each
        piece gives, bit for bit)."""
        if not (self._grid_fit(x, unit, grid, piece) and (f is None or (
                f.dtype in _GRID_WEIGHTS and _fit(f, f.dtype, 2) and f.shape == x.shape))):
            return None
        P = x.shape[0]
        total = torch.zeros(P * (2 * grid + 1), dtype=torch.float64, device="cpu")
        first, second = torch.zeros_like(total), torch.zeros(P, dtype=torch.float64, device="cpu")
        ok = self._grid(x, unit, grid, piece, f=f, total=total, first=first, second=second)
        return (total, first, second) if ok else None

    def optimal_choices(self, prefix: Tensor, k: int, tiny: float) -> Tensor | None:
        """The exact 1-D k-means program's table of choices ``(k, P, M)`` int32 for the prefix
        sums ``prefix`` ``(3, P, M + 1)`` float64 of ``M >= k`` bins (what
        :func:`~.optimal1d.choices_by_ops` gives, bit for bit: every value
        computed by the same operations in the same order, one palette and node at a time
        instead of vectorised over them, so no per-node operator call)."""
        if not (_fit(prefix, torch.float64, 3) and prefix.shape[0] == 3 and isinstance(k, int)
                and 1 <= k <= prefix.shape[2] - 1 < 1 << 31):
            return None
        _, P, M1 = prefix.shape
        M = M1 - 1
        choice = torch.empty(k, P, M, dtype=torch.int32, device="cpu")
        D, row, before = (torch.empty(n, dtype=torch.float64, device="cpu") for n in (M, M, M1))
        self._library.dkm_optimal_choices(prefix.data_ptr(), P, M, k, tiny, choice.data_ptr(),
                                          D.data_ptr(), row.data_ptr(), before.data_ptr())
        return choice

    def _grid(self, x: Tensor, unit: Tensor, grid: int, piece: int, *,
              counts: Tensor | None = None, sums: Tensor | None = None, f: Tensor | None = None,
              total: Tensor | None = None, first: Tensor | None = None,
              second: Tensor | None = None) -> bool:
        """``dkm_grid`` into the given tables (checked by the callers); whether it ran."""
        P, n = x.shape
        size = 2 * grid + 1
        part = torch.empty(3 * size, dtype=torch.float64, device="cpu")
        seen = torch.full((size,), -1, dtype=torch.int64, device="cpu")  # no piece yet
        touched = torch.empty(size, dtype=torch.int64, device="cpu")

        def at(t: Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        return self._library.dkm_grid(
            x.data_ptr(), P, n, unit.data_ptr(), grid, piece, at(counts), at(sums), at(f),
            _GRID_WEIGHTS[None if f is None else f.dtype], at(total), at(first), at(second),
            part.data_ptr(), seen.data_ptr(), touched.data_ptr()) == 0

    @staticmethod
    def _grid_fit(x: Tensor, unit: Tensor, grid: int, piece: int) -> bool:
        """``x`` (P, n) float32, one float32 power of two per palette as its unit (where the
        loop's product by ``1 / unit`` is the ops' division), ``grid`` a power of two and
        ``piece`` an int whose tables the loops can index."""
        return (_fit(x, torch.float32, 2) and _fit(unit.reshape(-1), torch.float32, 1)
                and unit.is_contiguous() and unit.numel() == x.shape[0]
                and isinstance(grid, int) and 1 <= grid <= 1 << 20 and grid & (grid - 1) == 0
                and isinstance(piece, int) and 1 <= piece < 1 << 62  # an int64 in C
                and x.shape[0] * (2 * grid + 1) < 1 << 62
                and bool((torch.frexp(unit).mantissa == 0.5).all()))

    def round_backward(self, a: Tensor, x: Tensor, rows: Tensor, c: Tensor, c_new: Tensor,
                       H: Tensor, two_over_tau: Tensor, shared: Tensor) -> Tensor | None:
        """One round of the weighted core's backward for scalar points with counts
        (:func:`~.weighted._round_backward`) over a chunk of ``m`` points: adds the round's
        shared part to ``shared`` (P, m) and returns ``dL/dc`` on its starting centroids
        (P, k). ``a`` (P, k, m) is the round's attention, ``x`` (P, m) the points, ``rows``
        (P, 2, m) their counts and counts times values, ``c``, ``c_new`` and ``H`` (P, k) the
        starting and updated centroids and ``U / mass``, ``two_over_tau`` (P,). Views whose
        points are contiguous are taken as they are (a chunk of a kept attention)."""
        if not self.core_agrees or a.dim() != 3 or rows.dim() != 3 or rows.shape[1] != 2:
            return None
        P, k, m = a.shape
        if not (_core_fits(a, x, rows, shared) and _small_fit(P, k, c, c_new, H)
                and _fit(two_over_tau, torch.float32, 1) and two_over_tau.numel() == P
                and x.shape == shared.shape == (P, m) and rows.shape == (P, 2, m)
                and _rows_apart(shared)):
            return None
        ranges = _point_ranges(P, k, m)
        parts = torch.empty(len(ranges), P, k, dtype=torch.float32, device="cpu")

        def run(i: int) -> None:
            s = ranges[i]
            self._library.dkm_round_backward(
                P, k, s.stop - s.start, _at(a, s.start), a.stride(0), a.stride(1),
                _at(x, s.start), x.stride(0), _at(rows, s.start),
                _at(rows, s.start, rows.stride(1)), rows.stride(0), c.data_ptr(),
                c_new.data_ptr(), H.data_ptr(), two_over_tau.data_ptr(), _at(shared, s.start),
                shared.stride(0), _at(parts, i * P * k))

        _in_parallel(run, len(ranges))
        return parts[0] if len(ranges) == 1 else parts.sum(0)

    def local_backward(self, a: Tensor, x: Tensor, G: Tensor, c: Tensor, c_new: Tensor,
                       two_over_tau: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The last round's local part for scalar points with counts (:func:`~.weighted._local`
        with ``per_copy``) over a chunk of ``m`` points, and the loss gradient of the final
        centroids: ``(local (P, m), dL/dc (P, k), U (P, k))`` for the attention ``a`` (P, k,
        m), the points ``x`` and their summed loss gradients ``G`` (P, m), the starting and
        final centroids ``c``, ``c_new`` (P, k) and ``two_over_tau`` (P,)."""
        if not self.core_agrees or a.dim() != 3:
            return None
        P, k, m = a.shape
        if not (_core_fits(a, x, G) and _small_fit(P, k, c, c_new)
                and _fit(two_over_tau, torch.float32, 1) and two_over_tau.numel() == P
                and x.shape == G.shape == (P, m)):
            return None
        ranges = _point_ranges(P, k, m)
        local = torch.empty(P, m, dtype=torch.float32, device="cpu")
        parts = torch.empty(2, len(ranges), P, k, dtype=torch.float32, device="cpu")

        def run(i: int) -> None:
            s = ranges[i]
            self._library.dkm_local_backward(
                P, k, s.stop - s.start, _at(a, s.start), a.stride(0), a.stride(1),
                _at(x, s.start), x.stride(0), _at(G, s.start), G.stride(0),
                c.data_ptr(), c_new.data_ptr(), two_over_tau.data_ptr(),
                _at(local, s.start), local.stride(0), _at(parts, i * P * k),
                _at(parts, (len(ranges) + i) * P * k))

        _in_parallel(run, len(ranges))
        to_c, U = (parts[:, 0] if len(ranges) == 1 else parts.sum(1)).unbind(0)
        return local, to_c, U


#: Attention entries (``P x k x points``) a thread of the core's loops takes at least: below
#: it a second thread costs more to start (about 0.1 ms) than it saves.
PARALLEL_GRAIN = 1 << 19

_pool: list[tuple[ThreadPoolExecutor, int]] = []  # the pool and its number of threads


def _point_ranges(P: int, k: int, m: int) -> list[slice]:
    """The points ``0..m`` of a core call cut over torch's threads, each with at least
    :data:`PARALLEL_GRAIN` attention entries, at multiples of the loops' 16 lanes."""
    return _ranges(m, P * k * m // PARALLEL_GRAIN, 16)


#: Weights a thread of the look-ups takes at least (each weight's result is its own, so the
#: values do not depend on the cut): a thread of the pool costs about 0.1 ms to hand work to,
#: and on 2 threads a look-up gained from it only past about a million weights (1.76 -> 1.08 ms
#: at 4.7 million, 0.12 -> 0.21 ms at 295,000; a throwaway timer, wall clock).
LOOK_UP_GRAIN = 1 << 21


def _weight_ranges(n: int) -> list[slice]:
    """The weights ``0..n`` of a look-up cut over torch's threads, each with at least
    :data:`LOOK_UP_GRAIN` weights, at multiples of 64 (whole cache lines)."""
    return _ranges(n, n // LOOK_UP_GRAIN, 64)


def _ranges(n: int, most: int, align: int) -> list[slice]:
    """``0..n`` in as many ranges as torch's intra-op threads (``torch.get_num_threads()``),
    at most ``most``, cut at multiples of ``align``; one range where one thread is enough."""
    parts = min(torch.get_num_threads(), most)
    if parts <= 1:
        return [slice(0, n)]
    bounds = [0, *(((n * i // parts) // align) * align for i in range(1, parts)), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _in_parallel(run: Callable[[int], None], count: int) -> None:
    """``run(0) .. run(count - 1)``, the first on this thread and the others on a pool of
    threads (a ``ctypes`` call releases the GIL, so the loops run at once); errors raised."""
    if count == 1:
        run(0)
        return
    if not _pool or _pool[0][1] < count - 1:  # grows with torch's threads
        _pool[:] = [(ThreadPoolExecutor(max_workers=count - 1,
                                        thread_name_prefix="lightning_dkm-core"), count - 1)]
    futures = [_pool[0][0].submit(run, i) for i in range(1, count)]
    try:
        run(0)
    finally:  # every range is done (or failed) before anything is read or raised
        for future in futures:
            future.exception()
    for future in futures:
        future.result()


def _at(t: Tensor, index: int, offset: int = 0) -> int:
    """The address of ``t[..., index]`` plus ``offset`` elements (every leading index 0):
    what ``t[..., index:].data_ptr()`` gives, without building the view (an operator call
    each, a few microseconds where a loop takes as little)."""
    return t.data_ptr() + (index * t.stride(-1) + offset) * t.element_size()


def _forget_pool() -> None:
    """A forked child has the pool's object but not its threads: it makes its own."""
    _pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)

def takes(*tensors: Tensor) -> bool:
    """Whether the loops may work on these tensors at all (before anything is built): real
    CPU tensors (not fake or distributed ones under a tracer, nor a parameter wrapping one),
    and, while autograd records, none that requires a gradient (a loop's result has no
    ``grad_fn``; the PyTorch ops then raise as they did for a second derivative)."""
    return all(map(_real_cpu, tensors))


def _real_cpu(t: Tensor) -> bool:
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_cpu
            and not (t.requires_grad and torch.is_grad_enabled()))


def _fit(t: Tensor, dtype: torch.dtype, dims: int) -> bool:
    """:func:`takes` ``t``, of ``dtype`` and ``dims`` dimensions, in contiguous memory that
    holds its values (not a lazily negated view, whose memory holds their negatives)."""
    return (_real_cpu(t) and t.dtype == dtype and t.dim() == dims and t.is_contiguous()
            and not t.is_neg() and (t.numel() == 0 or t.data_ptr() != 0))


def _constants_fit(x: Tensor, center: Tensor, inverse_unit: Tensor) -> bool:
    """``x`` (P, n) float32 and one float32 centre and inverse unit per palette."""
    return (_fit(x, torch.float32, 2) and all(
        _fit(c.reshape(-1), torch.float32, 1) and c.is_contiguous()
        and c.numel() == x.shape[0] for c in (center, inverse_unit)))


def _core_fits(*views: Tensor) -> bool:
    """Float32 views the core's loops walk: real CPU tensors whose last dimension is
    contiguous (rows at any stride, as a chunk of a larger tensor has them)."""
    return all(_real_cpu(t) and t.dtype == torch.float32 and t.dim() >= 2
               and (t.shape[-1] <= 1 or t.stride(-1) == 1) and t.data_ptr() != 0
               for t in views)


def _rows_apart(out: Tensor) -> bool:
    """An output (P, m) whose rows do not overlap (an expanded view's would: the loops would
    add every palette into one row, where PyTorch's in-place ops refuse)."""
    return out.shape[0] <= 1 or out.stride(0) >= out.shape[1]


def _small_fit(P: int, k: int, *tables: Tensor) -> bool:
    """(P, k) float32 tables in contiguous memory, ``k`` within :data:`CORE_MAX_K`."""
    return 0 < k <= CORE_MAX_K and all(
        _fit(t, torch.float32, 2) and t.shape == (P, k) for t in tables)

def _tables_fit(codes: Tensor, out: Tensor, *tables: Tensor) -> bool:
    """Codes (P, n) float16, ``out`` of their shape in float32, tables of P * 65536 float32."""
    return (_fit(codes, torch.float16, 2) and _fit(out, torch.float32, 2)
            and out.shape == codes.shape
            and all(_fit(t, torch.float32, 1) and t.numel() == codes.shape[0] * _CODES
                    for t in tables))


_state: dict[str, object] = {}


def kernels(check: Callable[[Kernels], str | None] | None = None) -> Kernels | None:
    """The loaded loops, built on first use; ``None`` where they cannot be used (module
    docstring), with the reason in :func:`build_failure`. ``check`` is called with the loops
    when they first load (:func:`~.float16_codes._fused_disagreement` compares them with the PyTorch
    ops and sets :attr:`Kernels.fused_multiply_add`); a reason it returns means they are not
    used."""
    if "kernels" not in _state:
        loaded, failure = _load()
        if loaded is not None and check is not None:
            failure = check(loaded)
            loaded = None if failure is not None else loaded
        _state["kernels"], _state["failure"] = loaded, failure
        if failure is not None and os.environ.get(_ENV) != "1":
            log.info("lightning_dkm: the 'unique' DKM step uses PyTorch ops for its passes "
                     "over the weights (%s)", failure)
    if _state["failure"] is not None and os.environ.get(_ENV) == "1":
        raise RuntimeError(f"{_ENV}=1, but the native DKM loops cannot be used: "
                           f"{_state['failure']}")
    return _state["kernels"]  # type: ignore[return-value]


#: The check :func:`loops_for` loads the loops with (:func:`set_check`).
_check: list[Callable[[Kernels], str | None]] = []


def set_check(check: Callable[[Kernels], str | None]) -> None:
    """The comparison with the PyTorch ops that the loops must pass when they first load
    (:func:`~.float16_codes._fused_disagreement`, set when that module is imported), so that
    modules below it in the engine (:mod:`.kmeans`) can use the loops through
    :func:`loops_for` without importing it."""
    _check[:] = [check]


def loops_for(*tensors: Tensor) -> Kernels | None:
    """The loops where they are built, checked and take these tensors (never while
    ``torch.compile`` traces: a foreign call would break its graph); ``None`` before a check
    is set (nothing is loaded unchecked)."""
    if torch.compiler.is_compiling() or not _check or not takes(*tensors):
        return None  # checked first: nothing is built for tensors the loops cannot take
    return kernels(check=_check[0])


def build_failure() -> str | None:
    """Why :func:`kernels` gave ``None`` (``None`` when the loops are in use or not loaded)."""
    return _state.get("failure")  # type: ignore[return-value]


def forget() -> None:
    """Drop the loaded loops: the next :func:`kernels` loads them again (from the cache, or
    built anew where it is empty), as a new process would; for timing a first build."""
    _state.clear()


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """Within the block every pass runs as PyTorch ops (what ``LIGHTNING_DKM_NATIVE=0`` does
    for a whole process): for comparing the two side by side in one process."""
    saved = dict(_state)
    _state.update(kernels=None, failure="turned off by lightning_dkm.engine.native.turned_off()")
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def _load() -> tuple[Kernels | None, str | None]:
    setting = os.environ.get(_ENV, "auto")
    if setting not in ("0", "1", "auto"):
        raise ValueError(f"{_ENV}={setting!r}: use 0 (off), 1 (required) or auto (the default)")
    if setting == "0":
        return None, f"{_ENV}=0"
    if sys.byteorder != "little":
        return None, "a big-endian machine"
    compiler = shlex.split(os.environ.get("CC", "")) or next(
        ([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        return Kernels(ctypes.CDLL(str(build(compiler)))), None
    except (OSError, subprocess.SubprocessError) as error:
        return None, (f"building or loading {_SOURCE.name} with {' '.join(compiler)!r} failed: "
                      f"{error}")


def _cache_directory() -> Path:
    explicit = os.environ.get("LIGHTNING_DKM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_dkm"


def build(compiler: list[str], extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library built by ``compiler`` (a command, e.g. ``["ccache", "cc"]``) with
    ``extra_flags``, compiled into the cache unless it is there already; where the cache cannot
    be written, into a temporary directory removed at exit."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             errors="replace", timeout=60, check=True).stdout
    flags = (*_FLAGS, *extra_flags)
    # the machine's architecture too: a home directory shared by x86-64 and ARM nodes
    key = hashlib.sha256("\0".join((_SOURCE.read_text(), *compiler, version, *flags,
                                    sys.platform, platform.machine())).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    name = f"dkm_codes-{key}{suffix}"
    directory = _cache_directory()
    if (directory / name).exists():
        return directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return _compile(compiler, flags, directory, name)
    except OSError:  # a read-only cache: this process's own directory, built every time
        directory = Path(tempfile.mkdtemp(prefix="lightning_dkm-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        return _compile(compiler, flags, directory, name)


def _compile(compiler: list[str], flags: tuple[str, ...], directory: Path, name: str) -> Path:
    target = directory / name
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / name
        result = subprocess.run([*compiler, *flags, "-o", str(built), str(_SOURCE), "-lm"],
                                capture_output=True, text=True, errors="replace", timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip()[-2000:] or
                                             f"exit status {result.returncode}")
        os.replace(built, target)  # atomic: a process building it at once replaces the same
    return target
