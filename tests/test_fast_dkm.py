"""The chunked DKM step agrees with the reference unrolled DKM, in values and gradients.

Tolerances: in float64 both are the same computation in a different order (chunked sums, an
analytic backward instead of autograd), so they agree to ~1e-12. In float32 the attention
amplifies rounding by 1/tau near cluster boundaries, so we ask 1e-5 relative (norm-wise) for the
forward and 1e-3 relative for the weight gradient, which is far below the step-to-step change of
the gradient in training (mini-batch noise is O(1) relative).
"""

from __future__ import annotations

import pytest
import torch

from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.reference import dkm_cluster

CASES = [  # (P, n, d, k, tau)
    (1, 3000, 1, 4, 1e-2),
    (2, 2000, 1, 16, 1e-3),
    (3, 1000, 2, 16, 1e-2),
    (1, 1500, 4, 64, 3e-2),
    (2, 1000, 1, 4, 1.0),
]


def converged_start(x: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Centroids as training carries them: k-means, then a few DKM steps."""
    c = kmeans(x.detach(), k, torch.Generator().manual_seed(0), max_iter=30).centroids
    for _ in range(3):
        c = dkm_cluster(x.detach(), c, tau, max_iter=3, epsilon=0).centroids
    return c


def both(x, c, tau, **kwargs):
    outs, grads = [], []
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    for step in (dkm_cluster, chunked_dkm_cluster):
        xi = x.detach().clone().requires_grad_()
        extra = {"chunk": 257} if step is chunked_dkm_cluster else {}
        out = step(xi, c, tau, **kwargs, **extra)
        (out.weights * g).sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    return outs, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("P", "n", "d", "k", "tau"), CASES)
def test_float64_values_and_gradients_match_the_reference(P, n, d, k, tau):
    x = torch.randn(P, n, d, dtype=torch.float64) * 0.05
    (ref, fast), (g_ref, g_fast) = both(x, converged_start(x, k, tau), tau, max_iter=3, epsilon=0)
    assert rel(fast.weights, ref.weights) < 1e-12
    assert rel(fast.centroids, ref.centroids) < 1e-12
    assert rel(g_fast, g_ref) < 1e-9


@pytest.mark.parametrize(("P", "n", "d", "k", "tau"), CASES)
def test_float32_agrees_within_the_documented_tolerance(P, n, d, k, tau):
    x = torch.randn(P, n, d) * 0.05
    (ref, fast), (g_ref, g_fast) = both(x, converged_start(x, k, tau), tau, max_iter=3, epsilon=0)
    assert rel(fast.weights, ref.weights) < 1e-5
    assert rel(g_fast, g_ref) < 1e-3


def test_gradients_match_from_far_off_centroids_too():
    x = torch.randn(2, 800, 2, dtype=torch.float64)
    c = torch.randn(2, 8, 2, dtype=torch.float64) * 3
    _, (g_ref, g_fast) = both(x, c, 0.1, max_iter=4, epsilon=0)
    assert rel(g_fast, g_ref) < 1e-9


def test_early_stop_takes_the_same_number_of_iterations():
    x = torch.randn(1, 2000, 1, dtype=torch.float64)
    c = converged_start(x, 4, 1e-3)
    (ref, fast), _ = both(x, c, 1e-3, max_iter=10, epsilon=1e-6)
    assert ref.iterations == fast.iterations < 10
    assert rel(fast.weights, ref.weights) < 1e-12


def test_empty_clusters_keep_their_centroid_and_gradients_stay_finite():
    x = torch.randn(1, 500, 1) * 0.05
    c = torch.tensor([[[-0.05], [0.0], [0.05], [40.0]]])  # the last one attracts nothing
    (_, fast), (g_ref, g_fast) = both(x, c, 1e-2, max_iter=3, epsilon=0)
    assert fast.centroids[0, 3, 0] == c[0, 3, 0]
    assert torch.isfinite(g_fast).all()
    assert rel(g_fast, g_ref) < 1e-3


@pytest.mark.parametrize("tau", [1e-7, 1e-12])
def test_tiny_tau_stays_finite(tau):
    x = (torch.randn(1, 1000, 1) * 1e-3).requires_grad_()
    c = kmeans(x.detach(), 8, torch.Generator().manual_seed(0)).centroids
    out = chunked_dkm_cluster(x, c, tau, max_iter=3)
    out.weights.square().sum().backward()
    assert torch.isfinite(out.weights).all() and torch.isfinite(x.grad).all()


def test_saved_state_does_not_grow_with_max_iter():
    """What autograd keeps for the backward: the reference keeps ~one k x n matrix per iteration;
    the chunked step keeps the input and a (max_iter + 1) x k centroid trajectory."""

    def saved_elements(step, max_iter: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        x = torch.randn(1, 20000, 1).requires_grad_()
        c = torch.linspace(-2, 2, 16).view(1, 16, 1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(x, c, 1e-2, max_iter=max_iter, epsilon=0)
        return total

    ref = [saved_elements(dkm_cluster, m) for m in (1, 3, 9)]
    fast = [saved_elements(chunked_dkm_cluster, m) for m in (1, 3, 9)]
    assert ref[2] > 3 * ref[0]  # grows with the iterations
    assert fast[2] - fast[0] <= 8 * 16 + 8 * 16  # only centroids and masses per iteration
    assert fast[2] < ref[0] / 4
