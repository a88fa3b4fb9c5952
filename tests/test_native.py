"""The native loops of the "unique" step (``lightning_dkm.engine.native``): the same values as
the PyTorch ops they replace, bit for bit, and a clean fall back to those ops wherever they
cannot be built."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import shutil

import pytest
import torch

from lightning_dkm.engine import native
from lightning_dkm.engine.distinct import unique_dkm_batch, unique_dkm_cluster
from lightning_dkm.engine.float16_codes import (
    CodeColumns,
    DistinctValues,
    _fused_disagreement,
    _same,
    distinct_from_counts,
    encode,
    prepare,
)

CODES = 1 << 16
loops = native.loops_for()
needs_loops = pytest.mark.skipif(loops is None, reason=f"not built here: {native.build_failure()}")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not loaded the loops yet, with its own cache directory; the loaded
    state of this process is restored afterwards."""
    saved = dict(native._state)
    native._state.clear()
    monkeypatch.setenv("LIGHTNING_DKM_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    native._state.clear()
    native._state.update(saved)


compiler_here = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                     or shutil.which("clang"))


@pytest.mark.skipif(not compiler_here or os.environ.get("LIGHTNING_DKM_NATIVE") == "0",
                    reason="no C compiler here, or the loops are turned off")
def test_the_loops_are_in_use_where_there_is_a_compiler() -> None:
    """Where they build, they pass their check against the PyTorch ops (else the tests below
    would skip instead of failing)."""
    assert loops is not None, native.build_failure()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.float16 else t


def weights(P: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the values that test float16's rounding: overflow, zero,
    subnormals, a tie between two float16 neighbours, NaN."""
    x = torch.randn(P, n, generator=torch.Generator().manual_seed(seed)) * 0.02 + 0.001
    x[0, :6] = torch.tensor([1e30, -1e30, 0.0, 1e-40, 0.5 + 2.0**-12, float("nan")])
    return x


@needs_loops
@pytest.mark.parametrize(("P", "n"), [(1, 524_289), (3, 4_097), (2, 7)])
def test_every_loop_gives_the_pytorch_ops_values_bit_for_bit(P, n) -> None:
    x = weights(P, n)
    center = x.nan_to_num().mean(1, keepdim=True)
    unit = torch.full((P, 1), 2.0**-20)
    codes = encode(x, center, unit, fused=False)
    columns = CodeColumns(codes, fused=False)
    g = torch.randn(P, n)
    a, b = torch.randn(P * CODES), torch.randn(P * CODES)

    counts = torch.empty(P * CODES, dtype=torch.int32)
    marks = torch.empty(P * native.MARK_WORDS, dtype=torch.int64)
    fused_codes = loops.encode_mark(x, center, 1.0 / unit, counts, marks)
    assert torch.equal(bits(fused_codes), bits(codes))
    assert torch.equal(bits(loops.encode(x, center, 1.0 / unit)), bits(codes))
    assert torch.equal(counts.to(torch.int64), columns.sum_per_code())
    assert torch.equal(loops.count(codes), columns.sum_per_code())
    assert torch.equal(loops.sum_per_code(codes, g), columns.sum_per_code(g))
    assert torch.equal(loops.look_up(codes, a, torch.empty(P, n)), columns.look_up(a))
    assert torch.equal(loops.look_up_affine(codes, a, b, g, torch.empty(P, n)),
                       columns.look_up(a, factor=(b, g)))


@needs_loops
@pytest.mark.parametrize("P", [1, 3])
def test_the_compaction_of_the_counts_is_nonzeros_bit_for_bit(P) -> None:
    """Every field of the distinct values: the occupied codes in code order, their palettes,
    ranks, float16 values (infinities, and NaN codes as NaN) and counts (one past float32's
    2^24, rounded as PyTorch converts), a palette with every code occupied, one with a single
    code."""
    generator = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 3, (P, CODES), generator=generator) * torch.randint(
        0, 2, (P, CODES), generator=generator)
    counts[0, 0x7C00] = 1  # +inf
    counts[0, 0x7E01] = (1 << 24) + 1  # a NaN code, a count float32 rounds
    if P > 1:
        counts[1] = 1  # every code
        counts[2] = 0
        counts[2, 0x8001] = 5  # one code: the smallest negative subnormal
    dense = counts.reshape(-1)
    with native.turned_off():
        want = distinct_from_counts(dense, P, torch.float32)
    got = distinct_from_counts(dense, P, torch.float32)
    for field in DistinctValues._fields:  # a NaN value only has to be one (_same)
        assert _same(getattr(want, field), getattr(got, field)), field
    assert got.values.isnan().any() and got.values.isinf().any()


@needs_loops
@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_the_unique_step_with_and_without_the_loops(gradient) -> None:
    """The forward (soft weights, centroids) bit for bit; the gradients up to the summation
    order of the core's backward loops (``Kernels.round_backward`` / ``local_backward``)."""
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(P, n, 1, generator=generator) * s
          for P, n, s in ((1, 70_000, 0.02), (1, 20_000, 3.0), (2, 30_000, 0.5))]
    cs = [torch.quantile(x.squeeze(-1), torch.linspace(0.1, 0.9, k), dim=1).T.unsqueeze(-1)
          for x, k in zip(xs, (4, 16, 4), strict=True)]
    gs = [torch.randn_like(x) for x in xs]

    def step():
        inputs = [x.clone().requires_grad_() for x in xs]
        outs = unique_dkm_batch(inputs, cs, [0.01, 0.003, 0.02], gradient=gradient)
        sum((o.weights * g).sum() for o, g in zip(outs, gs, strict=True)).backward()
        return [o.weights for o in outs] + [o.centroids for o in outs] + [x.grad for x in inputs]

    with core_loop_results() as ran:
        fused = step()
    assert "local_backward" in ran
    with native.turned_off():
        assert native.loops_for(xs[0]) is None
        plain = step()
    forward = 2 * len(xs)
    assert all(torch.equal(a, b) for a, b in zip(fused[:forward], plain[:forward], strict=True))
    for a, b in zip(fused[forward:], plain[forward:], strict=True):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@needs_loops
@pytest.mark.parametrize(("P", "n"), [(1, 524_289), (3, 4_097), (2, 7)])
def test_marked_counting_finds_the_distinct_values_of_zeroed_tables(P, n) -> None:
    """:meth:`~.native.Kernels.encode_mark` counts into int32 tables and marks the codes it
    saw (whatever both held before: garbage here): the codes and the distinct values its marks
    give are those of the int64 counts, field by field."""
    x = weights(P, n)
    center = x.nan_to_num().mean(1, keepdim=True)
    inverse_unit = torch.full((P, 1), 2.0**20)
    want_codes = encode(x, center, 1.0 / inverse_unit, fused=False)
    counts = CodeColumns(want_codes, fused=False).sum_per_code()
    want = distinct_from_counts(counts, P, torch.float32)
    garbage = torch.randint(-9, 9, (P * CODES,), dtype=torch.int32)
    marks = torch.full((P * native.MARK_WORDS,), -1, dtype=torch.int64)
    codes = loops.encode_mark(x, center, inverse_unit, garbage, marks)
    assert torch.equal(bits(codes), bits(want_codes))
    ids, rows, cols, patterns, value_counts, occupied = loops.marked_distinct(garbage, marks, P)
    assert sum(occupied) == ids.numel() == int((counts > 0).sum())
    assert torch.equal(ids, want.ids)
    if P > 1:
        assert torch.equal(rows, want.rows) and torch.equal(cols, want.cols)
    assert _same(patterns.view(torch.float16).to(torch.float32), want.values)
    assert torch.equal(value_counts, want.counts)


@needs_loops
def test_sums_at_and_spread_refuse_indices_outside_their_tables() -> None:
    codes = torch.zeros(1, 8, dtype=torch.float16)
    g, out = torch.ones(1, 8), torch.zeros(2, 4)
    scratch = torch.empty(CODES)
    ids, rows, cols = (torch.tensor([v]) for v in (5, 0, 0))
    assert loops.sums_at(codes, g, scratch, ids, rows, cols, slice(0, 1), 0, out) is not None
    for bad in ((CODES, 0, 0), (-1, 0, 0), (5, 2, 0), (5, 0, 4)):  # beyond its palette, R, width
        ids, rows, cols = (torch.tensor([v]) for v in bad)
        out.zero_()
        assert loops.sums_at(codes, g, scratch, ids, rows, cols, slice(0, 1), 0, out) is None
        assert not out.any()
        assert loops.spread(out, ids, rows, cols) is None or bad == (CODES, 0, 0)
    assert loops.spread(out, torch.tensor([2 * CODES]), torch.tensor([1]),
                        torch.tensor([0])) is None


@needs_loops
@pytest.mark.parametrize("exact", [False, True])
def test_the_marked_tables_give_the_zeroed_tables_step_bit_for_bit(monkeypatch, exact) -> None:
    """A batch's forward and gradients with the count table never zeroed, the backward's sums
    taken at the distinct codes only (:meth:`~.native.Kernels.sums_at`) and the per-value
    tables spread by a loop, against counting into zeroed tables, summing over every code and
    scattering with PyTorch ops: bit for bit, for palettes of several tensors, an exact one,
    and a tensor whose output gets no gradient."""
    from lightning_dkm.engine import float16_codes

    generator = torch.Generator().manual_seed(3)
    shapes = ((1, 70_000, 0.02), (3, 9_000, 3.0), (2, 30_000, 0.5), (1, 600, 0.1))
    xs = [torch.randn(P, n, 1, generator=generator) * s for P, n, s in shapes]
    cs = [torch.quantile(x.squeeze(-1), torch.linspace(0.1, 0.9, k), dim=1).T.unsqueeze(-1)
          for x, k in zip(xs, (4, 16, 4, 8), strict=True)]
    gs = [torch.randn_like(x) for x in xs]
    gs[2] = None  # its output is not used

    def step():
        inputs = [x.clone().requires_grad_() for x in xs]
        outs = unique_dkm_batch(inputs, cs, [0.01, 0.003, 0.02, 0.05],
                                exact=[False, False, False, exact])
        sum((o.weights * g).sum() for o, g in zip(outs, gs, strict=True) if g is not None
            ).backward()
        return ([o.weights for o in outs] + [o.centroids for o in outs]
                + [x.grad for x in inputs if x.grad is not None])

    sums_at, spread = [], []
    monkeypatch.setattr(native.Kernels, "sums_at", _spy(native.Kernels.sums_at, sums_at))
    monkeypatch.setattr(native.Kernels, "spread", _spy(native.Kernels.spread, spread))
    marked = step()
    assert sums_at and spread and all(r is not None for r in sums_at + spread)
    with monkeypatch.context() as m:
        m.setattr(float16_codes, "_prepare_marked", lambda *args: None)
        m.setattr(native.Kernels, "spread", lambda *args: None)
        calls = len(sums_at)
        zeroed = step()
        assert len(sums_at) == calls  # without the marks' counts per palette: the dense sums
    assert len(marked) == len(zeroed)
    for a, b in zip(marked, zeroed, strict=True):
        assert _same(a, b)


def _spy(method, results: list):
    def spied(*args, **kwargs):
        result = method(*args, **kwargs)
        results.append(result)
        return result
    return spied


def _core_problem(P: int, U: int, k: int, seed: int, *, masked: bool = False):
    """A batch of ``P`` scalar palettes of ``U`` sorted points with counts (the last palette
    padded with count-0 points, with ``masked``: half its centroids masked out), centroids
    and one temperature per palette, and the loss gradient of the soft points."""
    generator = torch.Generator().manual_seed(seed)
    xt = torch.sort(torch.randn(P, 1, U, generator=generator), dim=2).values
    counts = torch.randint(1, 50, (P, U), generator=generator).float()
    counts[-1, U // 2:] = 0.0
    c0 = torch.sort(torch.randn(P, k, 1, generator=generator), dim=1).values
    inv_tau = torch.linspace(30.0, 80.0, P).reshape(P, 1, 1)
    mask = None
    if masked:
        mask = torch.ones(P, k, 1, dtype=torch.bool)
        mask[-1, k // 2:] = False
    G = torch.randn(P, 1, U, generator=generator)
    return xt, counts, c0, inv_tau, mask, G


@contextlib.contextmanager
def core_loop_results():
    """The names of the core's loops that returned a result (not ``None``: the ops ran)."""
    ran: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("round_backward", "local_backward"):
            real = getattr(native.Kernels, name)

            def spy(self, *args, real=real, name=name):
                out = real(self, *args)
                if out is not None:
                    ran.append(name)
                return out
            patch.setattr(native.Kernels, name, spy)
        yield ran


@needs_loops
@pytest.mark.parametrize("loop", ["round_backward", "local_backward"])
def test_a_core_loop_that_computes_otherwise_is_turned_off_by_the_check(monkeypatch,
                                                                         loop) -> None:
    """The check refuses the core's loops alone: the passes over the weights, bit for bit the
    PyTorch ops', keep theirs."""
    real = getattr(native.Kernels, loop)

    def off_by_a_little(self, *args):
        out = real(self, *args)
        if out is None:
            return None
        return out * 1.001 if isinstance(out, torch.Tensor) else (out[0] * 1.001, *out[1:])

    from lightning_dkm.engine.weighted import check_core_loops

    monkeypatch.setattr(loops, "core_agrees", True)  # both restored after the test
    monkeypatch.setattr(loops, "core_checked", False)
    check_core_loops(loops)  # the loops as built agree
    assert loops.core_agrees is True and loops.core_checked is True
    monkeypatch.setattr(native.Kernels, loop, off_by_a_little)
    monkeypatch.setenv("LIGHTNING_DKM_NATIVE", "1")  # required: the difference is an error
    with pytest.raises(RuntimeError, match="core's backward loops differ"):
        check_core_loops(loops)
    monkeypatch.setenv("LIGHTNING_DKM_NATIVE", "auto")
    check_core_loops(loops)
    assert _fused_disagreement(loops) is None
    assert loops.core_agrees is False
    a, small, t = torch.rand(1, 4, 40), torch.randn(1, 4), torch.ones(1)
    assert loops.local_backward(a, torch.randn(1, 40), torch.randn(1, 40), small, small,
                                t) is None
    assert loops.look_up(torch.zeros(1, 40, dtype=torch.float16), torch.randn(CODES),
                         torch.empty(1, 40)) is not None


@needs_loops
@pytest.mark.parametrize(("P", "U", "k", "chunk", "gradient", "masked", "mixed"), [
    (4, 5120, 16, 1 << 16, "unrolled", False, False),  # the digits CNN's 4-bit batch
    (4, 5120, 16, 1 << 16, "unrolled", False, True),  # its palettes stop at different rounds
    (3, 1001, 4, 1 << 16, "unrolled", True, True),  # a tail of 9 points past the lanes
    (2, 777, 16, 300, "unrolled", False, False),  # chunks of a kept attention: strided views
    (2, 777, 256, 300, "unrolled", False, False),  # 8 bits, chunks recomputed
    (3, 2000, 16, 1 << 16, "implicit", True, True),
    (1, 5, 2, 1 << 16, "unrolled", False, False),  # fewer points than lanes
])
def test_the_core_backward_loops_give_the_pytorch_ops_gradient(P, U, k, chunk, gradient,
                                                                masked, mixed) -> None:
    """``weighted_dkm_gradient`` with the loops agrees with the PyTorch ops to float32
    rounding, and is as close as they are to the same backward in float64 (on the same
    forward); palettes of one batch that stop at different rounds (``mixed``) walk the rounds
    with device flags."""
    from lightning_dkm.engine.numerics import Groups
    from lightning_dkm.engine.weighted import weighted_dkm, weighted_dkm_gradient

    xt, counts, c0, inv_tau, mask, G = _core_problem(P, U, k, seed=P * U + k, masked=masked)
    implicit = gradient == "implicit"
    _, _, trajectory = weighted_dkm(xt, counts, c0, inv_tau, max_iter=10 if mixed else 3,
                                    epsilon=0.05 if mixed else 0.0, chunk=chunk,
                                    centroid_mask=mask, implicit=implicit,
                                    groups=Groups(torch.arange(P), P) if mixed else None)
    assert (trajectory.ran is None) == mixed
    assert (trajectory.kept is not None) == (k <= 16)

    def backward(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cast = [t.to(dtype) for t in (xt, counts, inv_tau, G)]
        path = trajectory._replace(**{
            field: getattr(trajectory, field).to(dtype)
            for field in ("centroids", "masses", "kept") if getattr(trajectory, field) is not None})
        return weighted_dkm_gradient(cast[0], cast[1], path, cast[3], cast[2], chunk=chunk,
                                     implicit=implicit, centroid_mask=mask)

    with core_loop_results() as ran:
        fused = backward(torch.float32)
    assert "local_backward" in ran and ("round_backward" in ran)
    with native.turned_off():
        plain = backward(torch.float32)
    exact = backward(torch.float64)
    for got, want, truth in zip(fused, plain, exact, strict=True):
        scale = float(truth.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
        error_loops = float((got.double() - truth).abs().max())
        error_ops = float((want.double() - truth).abs().max())
        assert error_loops <= 2 * error_ops + 1e-7 * scale, (error_loops, error_ops)


@needs_loops
def test_prepare_counts_while_it_encodes() -> None:
    x = weights(1, 100_000).nan_to_num()
    codes, _, distinct, _, scale = prepare(x, None, device_side=False)
    with native.turned_off():
        codes_b, _, distinct_b, _, scale_b = prepare(x, None, device_side=False)
    assert torch.equal(bits(codes), bits(codes_b))
    assert torch.equal(distinct.values, distinct_b.values)
    assert torch.equal(distinct.counts, distinct_b.counts)
    assert torch.equal(scale, scale_b)


@needs_loops
def test_a_loop_refuses_arguments_it_cannot_read_and_the_pytorch_ops_run() -> None:
    """Every method checks dtype, shape and memory before C sees a pointer: anything else
    gives ``None`` and the caller's PyTorch ops (so no read past a buffer)."""
    P, n = 2, 1000
    x, codes = torch.randn(P, n), torch.zeros(P, n, dtype=torch.float16)
    center, inverse_unit = torch.zeros(P, 1), torch.ones(P, 1)
    table, out = torch.randn(P * CODES), torch.empty(P, n)
    assert loops.encode(x, center, inverse_unit) is not None
    assert loops.encode(x.half(), center.half(), inverse_unit.half()) is None
    assert loops.encode(x.double(), center, inverse_unit) is None
    assert loops.encode(x, center[:1], inverse_unit) is None  # one centre for two palettes
    assert loops.encode(x.t().contiguous().t(), center, inverse_unit) is None
    assert loops.encode_mark(x[:, ::2], center, inverse_unit,
                             torch.empty(P * CODES, dtype=torch.int32),
                             torch.empty(P * native.MARK_WORDS, dtype=torch.int64)) is None
    assert loops.look_up(codes, table.half(), out) is None
    assert loops.look_up(codes, table[:CODES], out) is None
    assert loops.look_up(codes, table, out[:, :10]) is None
    assert loops.sum_per_code(codes, torch.randn(P, n + 1)) is None
    assert loops.look_up_affine(codes, table, table, torch.randn(P, n).double(), out) is None
    assert loops.count(codes.float()) is None
    a, small, t = torch.rand(P, 4, n), torch.randn(P, 4), torch.ones(P)
    rows, shared = torch.randn(P, 2, n), torch.zeros(P, n)
    assert loops.round_backward(a, x, rows, small, small, small, t, shared) is not None
    assert loops.round_backward(a.transpose(1, 2).contiguous().transpose(1, 2), x, rows, small,
                                small, small, t, shared) is None  # points not contiguous
    assert loops.round_backward(a, x, rows, small, small, small.double(), t, shared) is None
    assert loops.round_backward(a, x, rows, small, small, small, t[:1], shared) is None
    assert loops.round_backward(a, x[:, 1:], rows, small, small, small, t, shared) is None
    assert loops.round_backward(a, x, rows[:, :1], small, small, small, t, shared) is None
    assert loops.round_backward(a, x, rows, small, small, small, t,
                                shared[:1].expand(P, n)) is None  # its rows would overlap
    assert loops.local_backward(a, x, x, small, small, t) is not None
    assert loops.local_backward(torch.rand(P, 257, n), x, x, torch.randn(P, 257),
                                torch.randn(P, 257), t) is None  # past 8 bits
    assert loops.local_backward(a, x, x.double(), small, small, t) is None
    assert not native.takes(torch.empty(4, device="meta"))
    assert native.loops_for(torch.empty(4, device="meta")) is None
    # the public entry points fall back and match the PyTorch ops
    unit = torch.full((P, 1), 2.0**-10)
    assert torch.equal(encode(x.half().float()[:, ::2], center, unit).view(torch.int16),
                       encode(x.half().float()[:, ::2], center, unit, fused=False)
                       .view(torch.int16))
    columns = CodeColumns(encode(x, center, unit))
    assert torch.equal(columns.look_up(table.double()), CodeColumns(
        encode(x, center, unit), fused=False).look_up(table.double()))
    # a float64 step falls back to the PyTorch ops
    x64 = (torch.randn(1, 20_000, 1, dtype=torch.float64) * 0.1).requires_grad_()
    c = torch.linspace(-0.1, 0.1, 4, dtype=torch.float64).reshape(1, 4, 1)
    assert unique_dkm_cluster(x64, c, 0.01).weights.dtype == torch.float64


@needs_loops
def test_a_second_derivative_is_refused_as_by_the_pytorch_ops() -> None:
    """A loop's result has no graph: where autograd records (``create_graph=True``) the
    PyTorch ops run, and refuse as they always did, instead of a silently missing term."""
    c = torch.linspace(-0.04, 0.04, 4).reshape(1, 4, 1)
    for context in (contextlib.nullcontext(), native.turned_off()):
        x = (torch.randn(1, 30_000, 1) * 0.02).requires_grad_()
        with context, pytest.raises(RuntimeError, match=r"out=\.\.\. arguments don.t support"):
            out = unique_dkm_cluster(x, c, 0.01)
            torch.autograd.grad((out.weights**2).sum(), x, create_graph=True)


def test_the_check_holds_whatever_the_default_dtype_and_device(fresh_state) -> None:
    """The loops' check builds its own float32 CPU tensors: a process whose default dtype is
    float64 or whose default device is ``meta`` still gets (and checks) real loops."""
    if not compiler_here:
        pytest.skip("no C compiler here")
    saved = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            x = torch.randn(2, 3, device="cpu", dtype=torch.float32)
            assert native.loops_for(x) is not None
    finally:
        torch.set_default_dtype(saved)
    assert native.build_failure() is None


def test_a_loop_that_rounds_otherwise_is_caught_by_the_check() -> None:
    class Wrong:
        """The loops of this machine, but a look-up that is off by one ulp."""

        fused_multiply_add = True

        def __getattr__(self, name):
            return getattr(loops, name)

        def look_up(self, codes, table, out):
            return loops.look_up(codes, table, out).nextafter_(torch.tensor(float("inf")))

    if loops is None:
        pytest.skip(f"not built here: {native.build_failure()}")
    assert _fused_disagreement(loops) is None
    assert _fused_disagreement(Wrong()) == "its results differ from PyTorch's in: look-up"


def test_a_grid_loop_that_adds_otherwise_is_caught_by_the_check() -> None:
    """The grid of ``average_bits``' estimate is checked at load like the step's loops: a
    per-palette sum off by one ulp, or a count off by one, turns the library off."""
    class Wrong:
        """The loops of this machine, but one grid table off."""

        fused_multiply_add = True

        def __init__(self, table):
            self.table = table

        def __getattr__(self, name):
            return getattr(loops, name)

        def grid_counts(self, *args):
            counts, sums = loops.grid_counts(*args)
            return (counts + 1, sums) if self.table == "counts" else (counts, sums)

        def grid_sums(self, *args):
            total, first, second = loops.grid_sums(*args)
            if self.table == "second":
                second = second.nextafter(torch.tensor(float("inf"), dtype=torch.float64))
            return total, first, second

    if loops is None:
        pytest.skip(f"not built here: {native.build_failure()}")
    assert _fused_disagreement(Wrong(None)) is None
    assert _fused_disagreement(Wrong("counts")) == (
        "its results differ from PyTorch's in: grid counts (64 columns), grid counts (16 "
        "columns)")
    assert _fused_disagreement(Wrong("second")) == (
        "its results differ from PyTorch's in: " + ", ".join(
            f"grid sums of f r^2 ({dtype}, {columns} columns)" for columns in (64, 16)
            for dtype in (None, torch.float32, torch.float64)))


def test_the_portable_conversion_rounds_as_pytorch_nan_payloads_included(tmp_path,
                                                                         monkeypatch) -> None:
    """The build older compilers get (no float16 type, no F16C): every loop passes the check,
    and the codes of infinities and of NaNs with every top-payload pattern are PyTorch's."""
    if not compiler_here:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("LIGHTNING_DKM_CACHE", str(tmp_path))
    portable = native.Kernels(ctypes.CDLL(str(native.build(
        shlex.split(os.environ.get("CC", "")) or ["cc"], ("-DDKM_PORTABLE",)))))
    assert _fused_disagreement(portable) is None
    payloads = torch.arange(1 << 10, dtype=torch.int32) << 13 | 0x1234
    bits_ = torch.cat([0x7F800000 | payloads, 0xFF800000 - (1 << 32) | payloads,
                       torch.tensor([0x7F800000, -8388608], dtype=torch.int32)])
    x = bits_.view(torch.float32).reshape(1, -1).contiguous()
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    assert torch.equal(portable.encode(x, zero, one).view(torch.int16),
                       x.half().view(torch.int16))


def test_required_loops_raise_on_every_call(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("LIGHTNING_DKM_NATIVE", "1")
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"LIGHTNING_DKM_NATIVE=1.*/nonexistent/cc"):
            native.loops_for()


def test_a_compiler_command_with_arguments(fresh_state, monkeypatch) -> None:
    """``CC="cc -O2"`` (or ``ccache cc``) is a command, split as a shell would."""
    if not shutil.which("cc"):
        pytest.skip("no cc here")
    monkeypatch.setenv("CC", "cc -O2")
    assert native.loops_for() is not None, native.build_failure()


def test_turned_off_by_the_environment(fresh_state, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LIGHTNING_DKM_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger="lightning_dkm.engine.native"):
        assert native.loops_for() is None
    assert native.build_failure() == "LIGHTNING_DKM_NATIVE=0"
    assert "uses PyTorch ops" in caplog.text and "LIGHTNING_DKM_NATIVE=0" in caplog.text
    x = torch.randn(1, 30_000, 1).requires_grad_()
    unique_dkm_cluster(x, torch.linspace(-1, 1, 4).reshape(1, 4, 1), 0.01).weights.sum().backward()
    assert x.grad is not None


def test_a_compiler_that_fails_means_the_pytorch_ops(fresh_state, monkeypatch, tmp_path) -> None:
    failing = tmp_path / "broken-cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'no such luck' >&2\n"
                       "exit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert native.loops_for() is None
    assert "no such luck" in native.build_failure() and "broken-cc" in native.build_failure()


def test_an_unknown_setting_is_an_error_naming_the_allowed_ones(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_DKM_NATIVE", "yes")
    with pytest.raises(ValueError, match=r"LIGHTNING_DKM_NATIVE='yes'.*0 \(off\), 1 .*auto"):
        native.loops_for()


@needs_loops
def test_a_machine_builds_the_library_once(fresh_state, monkeypatch, tmp_path) -> None:
    """The second process finds the library in the cache and does not compile."""
    log = tmp_path / "compiles"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] || echo x >> {log}\nexec cc \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.loops_for() is not None
    native.forget()  # a second process
    assert native.loops_for() is not None
    assert log.read_text().count("x") == 1
    assert len(list(fresh_state.glob("dkm_codes-*"))) == 1


@needs_loops
def test_the_core_loops_split_the_points_over_torchs_threads(monkeypatch) -> None:
    """With several intra-op threads the points are cut into ranges of whole lanes, one per
    thread: a point's local part is the one thread's bit for bit; what goes through sums over
    the points (dL/dc, U, and the shared part through them) agrees up to summation order."""
    from lightning_dkm.engine.weighted import weighted_dkm, weighted_dkm_gradient

    xt, counts, c0, inv_tau, mask, G = _core_problem(3, 4099, 16, seed=5, masked=True)
    _, _, trajectory = weighted_dkm(xt, counts, c0, inv_tau, max_iter=3, epsilon=0.0,
                                    centroid_mask=mask)  # one forward for both

    def backward() -> tuple[torch.Tensor, torch.Tensor]:
        with core_loop_results() as ran:
            out = weighted_dkm_gradient(xt, counts, trajectory, G, inv_tau, centroid_mask=mask)
        assert ran
        return out

    threads = torch.get_num_threads()
    one = backward()
    assert native._point_ranges(3, 16, 4099) == [slice(0, 4099)]
    monkeypatch.setattr(native, "PARALLEL_GRAIN", 1024)
    torch.set_num_threads(3)
    try:
        ranges = native._point_ranges(3, 16, 4099)
        several = backward()
    finally:
        torch.set_num_threads(threads)
    assert [(r.start, r.stop) for r in ranges] == [(0, 1360), (1360, 2720), (2720, 4099)]
    # the shared part sums per point in the same order; the local part b too
    assert torch.equal(one[1], several[1])
    torch.testing.assert_close(several[0], one[0], rtol=1e-5, atol=1e-6)


@needs_loops
def test_the_look_ups_split_the_weights_over_torchs_threads_bit_for_bit(monkeypatch) -> None:
    """Each weight's look-up is its own: ranges of the weights on several threads (rows of two
    palettes cut alike) give the one-thread result bit for bit."""
    P, n = 2, 10_001
    generator = torch.Generator().manual_seed(3)
    codes = (torch.randn(P, n, generator=generator) * 3).half()
    a, b = torch.randn(2, P * CODES, generator=generator)
    g = torch.randn(P, n, generator=generator)
    one = (loops.look_up(codes, a, torch.empty(P, n)),
           loops.look_up_affine(codes, a, b, g, torch.empty(P, n)))
    threads = torch.get_num_threads()
    monkeypatch.setattr(native, "LOOK_UP_GRAIN", 1000)
    torch.set_num_threads(3)
    try:
        assert len(native._weight_ranges(n)) == 3
        several = (loops.look_up(codes, a, torch.empty(P, n)),
                   loops.look_up_affine(codes, a, b, g, torch.empty(P, n)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, several, strict=True))


@needs_loops
def test_the_core_loops_leave_a_recorded_backward_to_the_pytorch_ops(monkeypatch) -> None:
    """Where autograd records the backward itself (an upstream gradient that requires grad,
    as ``create_graph=True`` gives), the loops, whose results have no graph, are not used."""
    from lightning_dkm.engine.weighted import weighted_dkm, weighted_dkm_gradient

    xt, counts, c0, inv_tau, _, G = _core_problem(2, 300, 4, seed=7)
    _, _, trajectory = weighted_dkm(xt, counts, c0, inv_tau, max_iter=2, epsilon=0.0)
    calls = []
    for name in ("round_backward", "local_backward"):
        monkeypatch.setattr(native.Kernels, name, lambda self, *a, name=name: calls.append(name))
    G = G.clone().requires_grad_()
    with torch.enable_grad():
        shared, _ = weighted_dkm_gradient(xt, counts, trajectory, G, inv_tau)
    assert calls == []
    assert shared.requires_grad  # b (the local part for g = 1) does not depend on G


@needs_loops
@pytest.mark.parametrize("k", [1, 2, 4, 16, 256])
def test_the_nearest_centroid_loop_gives_the_pytorch_ops_indices(k) -> None:
    """Every weight's nearest centroid (ties to the lower index) as the PyTorch ops find it:
    weights in and beyond the centroids' range, NaN and infinite weights, weights midway
    between two centroids, a centroid given twice, and a palette with a NaN centroid (there
    the ops' binary search decides, and the loop takes it too)."""
    from lightning_dkm.engine.kmeans import nearest_1d_by_ops

    generator = torch.Generator().manual_seed(k)
    c = torch.randn(3, k, generator=generator)
    if k > 1:
        c[1, 1] = c[1, 0]  # twice: the lower index wins
        c[2, k // 2] = float("nan")
    x = torch.randn(3, 5_000, generator=generator) * 2
    midway = (c[0, 0] + c[0, -1]) / 2
    x[:, :5] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, float(midway)])
    x[1, 5:7] = c[1, 0]
    if k > 1:
        x[1, 7] = (c[1, 0] + c[1, 2 % k]) / 2  # midway to a centroid given twice
    sorted_c, order = torch.sort(c, dim=-1, stable=True)
    want = nearest_1d_by_ops(x, sorted_c, order)
    assert torch.equal(loops.nearest_sorted(x, sorted_c, order), want)
    # ties, also between copies of one centroid, go to the lowest index, as argmin's do
    finite = x[:2, 5:]
    argmin = (finite.unsqueeze(-1) - c[:2].unsqueeze(1)).abs().argmin(-1)
    assert torch.equal(want[:2, 5:], argmin)


@needs_loops
@pytest.mark.parametrize(("P", "n", "piece"), [(1, 300_001, 1 << 17), (3, 5_000, 2_000),
                                               (700, 40, 3)])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_the_grid_loops_give_bincounts_sums_per_piece_bit_for_bit(monkeypatch, P, n, piece,
                                                                  dtype) -> None:
    """``average_bits``' estimate (:mod:`lightning_dkm.model.bit_budget`): each palette's
    count and sum of values per grid cell and the sensitivity's sums per cell, whether a
    piece of a palette spans more columns than the grid has cells (one zeroed table) or fewer
    (the cells it touched, listed: 700 palettes of 3 columns a piece), bit for bit what the
    PyTorch ops' ``bincount`` per piece gives, with weights on the grid's edges, repeated,
    zero, -0 and subnormal; a float64 sensitivity is read, not written."""
    from lightning_dkm.engine.kmeans import palette_unit
    from lightning_dkm.engine.value_grid import cell_sums_by_ops
    from lightning_dkm.model import bit_budget

    monkeypatch.setattr(bit_budget, "_PIECE", piece * P)
    gen = torch.Generator().manual_seed(P)
    x = torch.randn(P, n, generator=gen) * torch.randn(P, 1, generator=gen).exp()
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-40, 3.0, -3.0, 1.0, 1.0, 1.0]) * x[0].abs().max()
    unit = palette_unit(x.unsqueeze(-1))
    cells, offsets, counts, sums = bit_budget._grid_values(x, unit.view(-1, 1))
    got = loops.grid_counts(x, unit.reshape(-1), bit_budget._GRID, piece)
    assert torch.equal(got[0], counts) and torch.equal(got[1], sums)
    f = None if dtype is None else torch.rand(P, n, generator=gen, dtype=dtype)
    kept = None if f is None else f.clone()
    want = cell_sums_by_ops(cells, offsets, f, bit_budget._GRID, piece)
    got = loops.grid_sums(x, unit.reshape(-1), bit_budget._GRID, piece, f)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert f is None or torch.equal(f, kept)


@needs_loops
def test_the_grid_loops_refuse_what_they_cannot_read_or_values_off_the_grid() -> None:
    """Arguments of another dtype, shape or layout give ``None`` before C reads them; a unit
    below a palette's largest value (values off the grid) or not a power of two (where the
    loop's product by its inverse would not be the ops' division) gives ``None`` too."""
    x, unit = torch.randn(2, 100), torch.full((2,), 8.0)
    assert loops.grid_counts(x, unit, 512, 64) is not None
    assert loops.grid_counts(x.double(), unit, 512, 64) is None
    assert loops.grid_counts(x[:, ::2], unit, 512, 64) is None
    assert loops.grid_counts(x, unit[:1], 512, 64) is None
    assert loops.grid_counts(x, unit, 500, 64) is None  # not a power of two
    assert loops.grid_counts(x, unit, 512, 0) is None
    assert loops.grid_counts(x, unit, 512, 1 << 63) is None  # would wrap in C's int64
    assert loops.grid_counts(torch._neg_view(x), unit, 512, 64) is None  # memory holds -x
    assert loops.grid_sums(x, unit, 512, 64, torch.rand(2, 100).half()) is None
    assert loops.grid_sums(x, unit, 512, 64, torch.rand(2, 99)) is None
    assert loops.grid_counts(x, torch.full((2,), 0.5), 512, 64) is None
    assert loops.grid_counts(x, torch.full((2,), 6.0), 512, 64) is None  # not a power of two
    assert loops.grid_sums(x, torch.full((2,), 0.5), 512, 64, None) is None
