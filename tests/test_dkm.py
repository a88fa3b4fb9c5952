"""Specification of the differentiable k-means (DKM) step: limits in tau, gradients, numerics."""

from __future__ import annotations

import pytest
import torch

from lightning_dkm.engine.kmeans import kmeans, lloyd, sq_distances
from lightning_dkm.engine.numerics import Normalization, hard_assign, normalization_of
from lightning_dkm.engine.reference import dkm_cluster, soft_assignment


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hard_inertia(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return sq_distances(x.mT, c).amin(1).sum(-1)


def start_centroids(x: torch.Tensor, k: int) -> torch.Tensor:
    return kmeans(x, k, seeded(0), max_iter=2).centroids


# -- limits in tau -------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2])
def test_tau_to_zero_gives_exactly_the_hard_nearest_centroid_weight(d: int, gen) -> None:
    x = torch.randn(2, 300, d, generator=gen)
    out = dkm_cluster(x, start_centroids(x, 8), 1e-30, max_iter=100, epsilon=0)
    _, snapped = hard_assign(x, out.centroids)
    assert torch.equal(out.weights, snapped)


def test_tau_to_zero_attention_is_one_hot(gen) -> None:
    x = torch.randn(1, 100, 1, generator=gen)
    out = dkm_cluster(x, start_centroids(x, 4), 1e-30, max_iter=5, epsilon=0)
    assert bool(((out.attention == 0) | (out.attention == 1)).all())
    assert out.attention.shape == (1, 4, 100)  # laid out (P, k, n)
    assert torch.equal(out.attention.sum(1), torch.ones(1, 100))


@pytest.mark.parametrize("d", [1, 2])
def test_huge_tau_pulls_every_weight_to_the_palette_mean(d: int, gen) -> None:
    x = torch.randn(2, 200, d, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 5.0]).view(
        2, 1, 1
    )
    out = dkm_cluster(x, start_centroids(x, 8), 1e6, max_iter=3, epsilon=0)
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True)
    assert bool(((out.weights - mean).abs() < 1e-4 * std).all())
    assert bool(((out.centroids - mean).abs() < 1e-4 * std).all())


@pytest.mark.parametrize("tau", [1e-3, 1e-6])
@pytest.mark.parametrize("d", [1, 2])
def test_dkm_iterations_never_increase_kmeans_inertia(d: int, tau: float, gen) -> None:
    x = torch.randn(2, 300, d, generator=gen, dtype=torch.float64)
    c = x[:, :8].clone()  # a poor start: the first 8 points
    sequence = [hard_inertia(x, c)]
    for _ in range(30):
        c = dkm_cluster(x, c, tau, max_iter=1, epsilon=0).centroids
        sequence.append(hard_inertia(x, c))
    s = torch.stack(sequence)
    # A soft step is a Lloyd step up to O(tau): points near a boundary are shared. Hard inertia
    # is therefore non-increasing up to a slack proportional to tau.
    slack = 1e-2 * tau * s[0]
    assert bool((s[1:] <= s[:-1] + slack).all()), s
    assert bool((s[-1] < 0.9 * s[0]).all())


def test_dkm_at_small_tau_converges_where_lloyd_does(gen) -> None:
    x = torch.randn(1, 300, 1, generator=gen, dtype=torch.float64)
    c = x[:, :8].clone()
    hard = lloyd(x, c, max_iter=200, tol=0).centroids
    soft = dkm_cluster(x, c, 1e-8, max_iter=200, epsilon=0).centroids
    torch.testing.assert_close(soft, hard)


def test_tau_is_measured_in_units_of_the_weight_variance(gen) -> None:
    x = torch.randn(1, 100, 2, generator=gen, dtype=torch.float64)
    c = start_centroids(x, 4)
    unit = dkm_cluster(x, c, 0.3, max_iter=3, epsilon=0)
    scaled = dkm_cluster(x * 1e-3 + 7.0, c * 1e-3 + 7.0, 0.3, max_iter=3, epsilon=0)
    torch.testing.assert_close(scaled.attention, unit.attention)
    torch.testing.assert_close(scaled.weights, unit.weights * 1e-3 + 7.0)


# -- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2])
def test_gradcheck_passes_through_the_unrolled_iterations(d: int, gen) -> None:
    x = torch.randn(2, 6, d, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    # gradcheck perturbs x, so the normalisation (by default computed from x) must be fixed.
    norm = Normalization(
        center=torch.zeros(2, 1, d, dtype=torch.float64),
        scale=torch.ones(2, 1, 1, dtype=torch.float64),
    )

    def clustered(inp: torch.Tensor) -> torch.Tensor:
        return dkm_cluster(inp, c, 0.5, max_iter=3, epsilon=0, normalization=norm).weights

    assert torch.autograd.gradcheck(clustered, (x,))


def test_centroids_are_returned_detached_in_the_units_of_x(gen) -> None:
    x = (torch.randn(1, 50, 1, generator=gen) * 3 + 10).requires_grad_()
    out = dkm_cluster(x, start_centroids(x.detach(), 4), 1e-2)
    assert out.weights.requires_grad and not out.centroids.requires_grad
    lo, hi = x.min().item(), x.max().item()
    assert bool(((out.centroids >= lo) & (out.centroids <= hi)).all())


# -- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1e-1, 1e-4, 1e-7])
@pytest.mark.parametrize(
    ("scale", "offset"), [(1e-6, 0.0), (1.0, 0.0), (1e4, 0.0), (1e-3, 1e3)], ids=str
)
@pytest.mark.parametrize("d", [1, 2])
def test_outputs_and_gradients_stay_finite(
    d: int, scale: float, offset: float, tau: float, gen
) -> None:
    x = (torch.randn(2, 200, d, generator=gen) * scale + offset).requires_grad_()
    c = start_centroids(x.detach(), 16)
    c[:, 0] = offset + 1e3 * max(scale, 1.0)  # an empty cluster, far outside the data
    out = dkm_cluster(x, c, tau, max_iter=3, epsilon=0)
    assert bool(torch.isfinite(out.weights).all()) and bool(torch.isfinite(out.centroids).all())
    (out.weights * torch.randn_like(out.weights)).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_an_empty_cluster_keeps_its_centroid(gen) -> None:
    x = torch.randn(1, 100, 1, generator=gen, dtype=torch.float64)
    c = torch.tensor([[[-1.0], [0.0], [1.0], [1e3]]], dtype=torch.float64)
    out = dkm_cluster(x, c, 1e-2, max_iter=3, epsilon=0)
    assert out.centroids[0, 3, 0].item() == pytest.approx(1e3, rel=1e-12)
    assert bool(torch.isfinite(out.weights).all())


def test_a_constant_palette_stays_finite_and_unchanged() -> None:
    x = torch.full((1, 32, 1), 0.25, requires_grad=True)
    c = torch.tensor([[[0.25], [0.5], [0.75], [1.0]]])
    out = dkm_cluster(x, c, 1e-7)
    assert torch.equal(out.weights.detach(), x.detach())
    out.weights.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_half_precision_weights_are_clustered_in_float32_and_returned_in_their_dtype(gen) -> None:
    x = torch.randn(1, 64, 1, generator=gen).to(torch.bfloat16)
    c = start_centroids(x.float(), 4)
    out = dkm_cluster(x, c, 1e-3)
    assert out.weights.dtype == torch.bfloat16 and out.centroids.dtype == torch.float32
    assert bool(torch.isfinite(out.weights.float()).all())


def test_soft_assignment_gives_each_point_a_distribution_over_centroids(gen) -> None:
    xt = torch.randn(2, 2, 30, generator=gen)  # normalised points laid out (P, d, n)
    cn = torch.randn(2, 5, 2, generator=gen)
    for tau in (1e3, 1.0, 1e-9, 1e-40):
        a = soft_assignment(xt, cn, tau)
        assert a.shape == (2, 5, 30)
        assert bool((a >= 0).all())
        torch.testing.assert_close(a.sum(1), torch.ones(2, 30))


def test_soft_assignment_is_the_softmax_of_negative_distances_over_tau(gen) -> None:
    xt = torch.randn(1, 2, 10, generator=gen, dtype=torch.float64)
    cn = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64)
    dist = (cn.unsqueeze(2) - xt.mT.unsqueeze(1)).square().sum(-1)  # (P, k, n)
    expected = torch.softmax(-dist / 0.7, dim=1)
    torch.testing.assert_close(soft_assignment(xt, cn, 0.7), expected)


def test_normalization_is_the_mean_vector_and_the_scalar_std(gen) -> None:
    x = torch.randn(2, 50, 2, generator=gen, dtype=torch.float64) * 3 + 1
    norm = normalization_of(x)
    torch.testing.assert_close(norm.center, x.mean(dim=1, keepdim=True))
    expected = (x - x.mean(dim=1, keepdim=True)).square().mean(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(norm.scale, expected)


def test_normalization_of_a_constant_palette_has_a_positive_scale() -> None:
    norm = normalization_of(torch.zeros(1, 10, 1))
    assert norm.scale.item() > 0


# -- epsilon, arguments and hard assignment ------------------------------------------------------
def test_epsilon_stops_early_and_zero_runs_every_iteration(gen) -> None:
    x = torch.randn(1, 100, 1, generator=gen)
    c = kmeans(x, 4, seeded(0)).centroids  # already converged
    assert dkm_cluster(x, c, 1e-6, max_iter=10, epsilon=1e-3).iterations < 10
    assert dkm_cluster(x, c, 1e-6, max_iter=10, epsilon=0).iterations == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iter": 0}, "max_iter must be an int >= 1; got 0"),
        ({"epsilon": -1.0}, "epsilon must be a finite number >= 0; got -1.0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number >= 0; got inf"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number >= 0; got nan"),
        ({"tau": 0.0}, "tau must be > 0; got 0.0"),
        ({"tau": -1.0}, "tau must be > 0; got -1.0"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs: dict, message: str) -> None:
    args = {"tau": 1e-2, **kwargs}
    tau = args.pop("tau")
    with pytest.raises(ValueError, match=message):
        dkm_cluster(torch.zeros(1, 4, 1), torch.zeros(1, 2, 1), tau, **args)


def test_hard_assign_snaps_to_the_nearest_centroid_by_gathering(gen) -> None:
    x = torch.randn(2, 40, 2, generator=gen)
    c = torch.randn(2, 4, 2, generator=gen)
    idx, snapped = hard_assign(x, c)
    assert torch.equal(idx, sq_distances(x.mT, c).argmin(1))
    for p in range(2):
        assert torch.equal(snapped[p], c[p][idx[p]])
    assert not snapped.requires_grad
