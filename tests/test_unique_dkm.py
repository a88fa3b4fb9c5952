"""The 'unique' DKM step (eDKM's idea): exact DKM of the float16-rounded normalised weights.

On weights whose normalised values the codes hold exactly (float16 numbers of
``x / 2^FLOOR_SHIFT``: multiples of ``2^-10`` below one, float16 numbers above) it must agree
with the reference step (values 1e-5, gradients 1e-3 relative, float32 rounding); on arbitrary
weights it differs by the codes' rounding only, which we bound loosely (1e-2) and report
precisely in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.engine.float16_codes import FLOOR_SHIFT, float16_codes
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import Normalization, sync_free
from lightning_dkm.engine.reference import dkm_cluster


def code_representable(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the codes round values of unit standard deviation (unit 2^14)."""
    shift = 2.0**FLOOR_SHIFT
    return (x / shift).half().float() * shift


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("P", "k", "tau"), [(1, 4, 1e-2), (2, 16, 1e-3), (3, 64, 3e-2)])
def test_matches_the_reference_on_weights_the_codes_hold_exactly(P, k, tau):
    x = code_representable(torch.randn(P, 4000, 1))
    norm = Normalization(torch.zeros(P, 1, 1), torch.ones(P, 1, 1))
    c = kmeans(x, k, torch.Generator().manual_seed(0), max_iter=20).centroids
    g = torch.randn(P, 4000, 1)
    results = []
    for step in (dkm_cluster, unique_dkm_cluster):
        xi = x.clone().requires_grad_()
        out = step(xi, c, tau, max_iter=3, epsilon=0, normalization=norm)
        (out.weights * g).sum().backward()
        results.append((out, xi.grad))
    (ref, g_ref), (fast, g_fast) = results
    assert rel(fast.weights, ref.weights) < 1e-5
    assert rel(fast.centroids, ref.centroids) < 1e-5
    assert rel(g_fast, g_ref) < 1e-3
    assert fast.iterations == ref.iterations


def test_on_arbitrary_weights_it_differs_only_by_the_rounding():
    x = torch.randn(1, 20000, 1) * 0.03
    c = kmeans(x, 16, torch.Generator().manual_seed(0), max_iter=20).centroids
    ref = dkm_cluster(x, c, 1e-2, max_iter=3, epsilon=0)
    fast = unique_dkm_cluster(x, c, 1e-2, max_iter=3, epsilon=0)
    assert rel(fast.weights, ref.weights) < 1e-2


def test_codes_round_within_one_std_on_an_even_grid_and_beyond_it_relatively():
    """The codes' rounding error is at most ``2^-11`` of the power of two nearest the std below
    one std (an even grid of ``2^-10``, float16's subnormals) and ``2^-11`` of the distance
    from the centre beyond it (float16's own precision), whatever the scale."""
    for scale in (1.0, 3e-7, 5e12):
        deviations = torch.cat((torch.linspace(-1, 1, 40001), torch.logspace(0, 4, 5000)))
        x = (deviations * scale).reshape(1, -1)
        norm = Normalization(torch.zeros(1, 1, 1), torch.full((1, 1, 1), scale))
        codes, _, unit, _ = float16_codes(x, norm)
        s = unit / 2.0**FLOOR_SHIFT  # the power of two nearest the std
        assert 0.5 < float(s / scale) <= 2.0
        rounded = codes.float() * unit
        error = (rounded - x).abs() / s
        small = x.abs() < s
        assert float(error[small].max()) <= 2.0**-11
        assert torch.equal(rounded[small] / s * 2.0**10, (rounded[small] / s * 2.0**10).round())
        relative = (rounded - x).abs() / x.abs()
        assert float(relative[~small].max()) <= 2.0**-11
    # far fewer distinct values than float16 with its relative precision near zero
    x = torch.randn(1, 1 << 19, generator=torch.Generator().manual_seed(0))
    codes = float16_codes(x, None)[0]
    assert codes.unique().numel() < (x.half().unique().numel()) / 3


def test_vectors_are_refused():
    with pytest.raises(ValueError, match="cluster_dim 1; got 2"):
        unique_dkm_cluster(torch.randn(1, 100, 2), torch.randn(1, 4, 2), 1e-2)


@pytest.mark.parametrize(
    ("mean", "std"),
    [(0.0, 1e-6), (0.0, 1e3), (5.0, 1e-3)],  # tiny, huge, and a mean 5000 stds from zero
    ids=["tiny-weights", "huge-weights", "offset-mean"],
)
def test_rounding_is_relative_to_the_spread_whatever_the_scale_and_offset(mean, std):
    """The float16 grid is laid on (x - mean) / 2^e with 2^e near the std, so neither tiny,
    huge nor far-off-centre weights lose precision (or overflow float16)."""
    x = (torch.randn(1, 20000, 1, dtype=torch.float64) * std + mean).float()
    c = kmeans(x, 8, torch.Generator().manual_seed(0), max_iter=20).centroids
    ref = dkm_cluster(x, c, 1e-2, max_iter=3, epsilon=0)
    fast = unique_dkm_cluster(x, c, 1e-2, max_iter=3, epsilon=0)
    assert torch.isfinite(fast.weights).all()
    assert rel(fast.weights - mean, ref.weights - mean) < 1e-2
    assert rel(fast.centroids - mean, ref.centroids - mean) < 1e-3


def test_half_precision_weights_give_half_precision_outputs_and_gradients():
    x = (torch.randn(1, 5000, 1) * 0.05).half().requires_grad_()
    c = kmeans(x.detach().float(), 4, torch.Generator().manual_seed(0), max_iter=20).centroids
    out = unique_dkm_cluster(x, c.half(), 1e-2, max_iter=3, epsilon=0)
    out.weights.float().sum().backward()
    assert out.weights.dtype == torch.float16 and x.grad.dtype == torch.float16
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("P", [1, 3])
def test_chunked_passes_give_the_same_result_as_one_chunk(P, monkeypatch):
    import lightning_dkm.engine.float16_codes as unique_dkm

    x = torch.randn(P, 5000, 1) * 0.1
    c = kmeans(x, 4, torch.Generator().manual_seed(0), max_iter=20).centroids
    g = torch.randn(P, 5000, 1)
    results = []
    # one chunk; several chunks, the last one short; and scratch pieces smaller than a chunk
    for chunk, piece in ((unique_dkm.CHUNK, unique_dkm.PIECE), (999, unique_dkm.PIECE),
                         (999, 250)):
        monkeypatch.setattr(unique_dkm, "CHUNK", chunk)
        monkeypatch.setattr(unique_dkm, "PIECE", piece)
        xi = x.clone().requires_grad_()
        out = unique_dkm_cluster(xi, c, 1e-2, max_iter=3, epsilon=0)
        (out.weights * g).sum().backward()
        results.append((out.weights.detach(), out.centroids, xi.grad))
    for other in results[1:]:
        for one, many in zip(results[0], other, strict=True):
            # each code's sum adds many weights, in chunk order: float32 rounding of those sums
            torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-6)


# -- without host reads: the full table of codes ------------------------------------------------
def _step(x, c, g, **kwargs):
    xi = x.clone().requires_grad_()
    out = unique_dkm_cluster(xi, c, 1e-2, max_iter=3, epsilon=0, **kwargs)
    (out.weights * g).sum().backward()
    return out.weights.detach(), out.centroids, xi.grad


@pytest.mark.parametrize(
    ("P", "mean", "std"),
    [(1, 0.0, 1e-6), (1, 0.0, 1e3), (1, 5.0, 1e-3), (3, 0.0, 1.0)],
    ids=["tiny-weights", "huge-weights", "offset-mean", "three-palettes"],
)
def test_without_host_reads_the_full_code_table_gives_the_compact_result(P, mean, std):
    """The accelerator form (every float16 code, unoccupied ones with count 0) is the same
    computation as the compacted distinct values: equal in float64 up to summation order
    (relative to each output's magnitude: the implicit gradient scales as 1 / std)."""
    torch.manual_seed(0)  # the same draw whatever ran before (the result was order-dependent)
    x = torch.randn(P, 20000, 1, dtype=torch.float64) * std + mean
    c = kmeans(x, 8, torch.Generator().manual_seed(0), max_iter=20).centroids
    g = torch.randn(P, 20000, 1, dtype=torch.float64)
    for implicit in (False, True):
        kwargs = {"gradient": "implicit"} if implicit else {}
        compact = _step(x, c, g, **kwargs)
        with sync_free():
            full = _step(x, c, g, **kwargs)
        for a, b in zip(full, compact, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()))


def test_without_host_reads_chunked_passes_give_the_same_result_as_one_chunk(monkeypatch):
    import lightning_dkm.engine.float16_codes as unique_dkm

    x = torch.randn(2, 5000, 1, dtype=torch.float64) * 0.1
    c = kmeans(x, 4, torch.Generator().manual_seed(0), max_iter=20).centroids
    g = torch.randn(2, 5000, 1, dtype=torch.float64)
    results = []
    with sync_free():
        for chunk in (unique_dkm.CHUNK, 999):  # one chunk; several, the last one short
            monkeypatch.setattr(unique_dkm, "CHUNK", chunk)
            results.append(_step(x, c, g))
    for one, many in zip(*results, strict=True):
        torch.testing.assert_close(many, one, rtol=1e-9, atol=1e-12)


# -- the implicit (IDKM) gradient -------------------------------------------------------------
def _gradient(x, c, tau, max_iter, gradient, norm, upstream):
    xi = x.clone().requires_grad_()
    out = unique_dkm_cluster(xi, c, tau, max_iter=max_iter, epsilon=0, normalization=norm,
                             gradient=gradient)
    (out.weights * upstream).sum().backward()
    return out, xi.grad


@pytest.mark.parametrize(("k", "tau"), [(4, 1e-1), (8, 1e-1)])
def test_implicit_gradient_is_the_limit_of_the_unrolled_one(k, tau):
    """Once the iterations have converged, differentiating at the fixed point (IDKM) gives
    what backpropagating through all of them gives."""
    torch.manual_seed(0)
    x = torch.randn(1, 20000, 1).half().float()
    norm = Normalization(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    c = kmeans(x, k, torch.Generator().manual_seed(0), max_iter=5).centroids
    upstream = torch.randn_like(x)
    unrolled_out, unrolled = _gradient(x, c, tau, 200, "unrolled", norm, upstream)
    implicit_out, implicit = _gradient(x, c, tau, 200, "implicit", norm, upstream)
    torch.testing.assert_close(implicit_out.weights, unrolled_out.weights)  # same forward
    assert rel(implicit, unrolled) < 1e-4
    # ... and after few iterations the two differ: the implicit one assumes convergence
    _, unrolled_3 = _gradient(x, c, tau, 3, "unrolled", norm, upstream)
    _, implicit_3 = _gradient(x, c, tau, 3, "implicit", norm, upstream)
    assert rel(implicit_3, unrolled_3) > 1e-3


def test_implicit_backward_saves_the_same_whatever_max_iter():
    x = (torch.randn(1, 30000, 1) * 0.02).requires_grad_()
    c = kmeans(x.detach(), 4, torch.Generator().manual_seed(0), max_iter=5).centroids
    saved: dict[int, list[int]] = {1: [], 9: []}
    for max_iter, sizes in saved.items():
        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unique_dkm_cluster(x, c, 1e-2, max_iter=max_iter, epsilon=0, gradient="implicit")
    assert sum(saved[1]) == sum(saved[9]) > 0


def test_unknown_gradient_is_refused():
    with pytest.raises(ValueError, match=r"gradient must be one of .*got 'exact'"):
        unique_dkm_cluster(torch.randn(1, 100, 1), torch.randn(1, 4, 1), 1e-2, gradient="exact")
    with pytest.raises(ValueError, match=r"gradient must be one of .*got 'exact'"):
        chunked_dkm_cluster(torch.randn(1, 100, 2), torch.randn(1, 4, 2), 1e-2, gradient="exact")


def test_off_the_cpu_the_passes_take_pieces_sized_for_kernel_launches_not_for_the_cache():
    """On the CPU the O(n) passes work a cache-sized piece at a time; on an accelerator each
    piece costs launches, so both take :data:`ACCELERATOR_CHUNK` weights (values unchanged:
    ``test_chunked_passes_give_the_same_result_as_one_chunk``)."""
    from lightning_dkm.engine.float16_codes import ACCELERATOR_CHUNK, CHUNK, PIECE, pass_sizes

    assert pass_sizes(torch.device("cpu")) == (CHUNK, PIECE)
    assert pass_sizes(torch.device("meta")) == (ACCELERATOR_CHUNK, ACCELERATOR_CHUNK)
    assert ACCELERATOR_CHUNK > CHUNK > PIECE
