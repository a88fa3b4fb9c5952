"""Specification of the one DKM core (lightning_dkm.engine.weighted): weighted DKM on points and
their weights, forward and analytic backward, which every step feeds.

The plain-autograd reference step is the oracle: a point of weight w is w copies of itself.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import Groups, Normalization, sync_free
from lightning_dkm.engine.reference import dkm_cluster
from lightning_dkm.engine.weighted import weighted_dkm, weighted_dkm_gradient


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor of these tests in float64 (exact comparisons), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _copies(values, counts):
    """The points repeated by their integer counts, as the reference sees them: (1, n, 1)."""
    return values.repeat_interleave(counts).reshape(1, -1, 1)


@pytest.mark.parametrize("max_iter", [1, 3])
def test_weighted_points_are_their_copies_forward_and_backward(max_iter):
    """DKM on (value, count) pairs is DKM on the repeated values: the same soft values, the
    same centroids, and per copy the gradient s_u + b_u g_i."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(300, generator=gen)
    counts = torch.randint(1, 5, (300,), generator=gen)
    c0 = torch.linspace(-1.5, 1.5, 4).reshape(1, 4, 1)
    tau = 0.05
    x = _copies(values, counts).requires_grad_()
    norm = Normalization(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    reference = dkm_cluster(x, c0, tau, max_iter=max_iter, epsilon=0, normalization=norm)
    g = torch.randn(x.shape, generator=gen)
    (reference.weights * g).sum().backward()

    y, c_final, trajectory = weighted_dkm(values.reshape(1, 1, -1), counts.double().reshape(1, -1),
                                          c0, 1 / tau, max_iter=max_iter, epsilon=0)
    torch.testing.assert_close(c_final, reference.centroids)
    torch.testing.assert_close(_copies(y.flatten(), counts), reference.weights.detach())
    owner = torch.arange(300).repeat_interleave(counts)
    G = torch.zeros(300).index_add_(0, owner, g.flatten()).reshape(1, 1, -1)
    shared, b = weighted_dkm_gradient(values.reshape(1, 1, -1), counts.double().reshape(1, -1),
                                      trajectory, G, 1 / tau)
    per_copy = shared.flatten()[owner] + b.flatten()[owner] * g.flatten()
    torch.testing.assert_close(per_copy, x.grad.flatten(), rtol=1e-9, atol=1e-12)


def test_padding_of_weight_zero_changes_nothing():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1, 1, 200, generator=gen)
    weights = torch.rand(1, 200, generator=gen) + 0.5
    c0 = torch.linspace(-1, 1, 4).reshape(1, 4, 1)
    padded_values = torch.cat((values, torch.zeros(1, 1, 50)), 2)
    padded_weights = torch.cat((weights, torch.zeros(1, 50)), 1)
    y, c, trajectory = weighted_dkm(values, weights, c0, 20.0, max_iter=3, epsilon=0)
    y_p, c_p, trajectory_p = weighted_dkm(padded_values, padded_weights, c0, 20.0, max_iter=3,
                                          epsilon=0)
    torch.testing.assert_close(c_p, c)
    torch.testing.assert_close(y_p[:, :, :200], y)
    G = torch.randn(1, 1, 200, generator=gen)
    s, b = weighted_dkm_gradient(values, weights, trajectory, G, 20.0)
    s_p, b_p = weighted_dkm_gradient(padded_values, padded_weights, trajectory_p,
                                     torch.cat((G, torch.zeros(1, 1, 50)), 2), 20.0)
    torch.testing.assert_close(s_p[:, :, :200], s)
    torch.testing.assert_close(b_p[:, :, :200], b)


def test_kept_and_recomputed_attention_give_the_same_gradient(monkeypatch):
    import lightning_dkm.engine.weighted as weighted

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3000, 2, generator=gen)
    c = kmeans(x, 8, torch.Generator().manual_seed(0), max_iter=5).centroids
    g = torch.randn(x.shape, generator=gen)
    grads = []
    for limit in (1 << 30, 0):  # keep every round's attention; keep none
        monkeypatch.setattr(weighted, "KEEP_ATTENTION_MAX_ENTRIES", limit)
        xi = x.clone().requires_grad_()
        (chunked_dkm_cluster(xi, c, 0.05, chunk=700).weights * g).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def _gradient(x, c, tau, max_iter, gradient, upstream):
    xi = x.clone().requires_grad_()
    norm = Normalization(torch.zeros(1, 1, x.shape[-1]), torch.ones(1, 1, 1))
    out = chunked_dkm_cluster(xi, c, tau, max_iter=max_iter, epsilon=0, normalization=norm,
                              gradient=gradient)
    (out.weights * upstream).sum().backward()
    return out, xi.grad


@pytest.mark.parametrize("d", [1, 2])
def test_implicit_gradient_of_the_exact_step_is_the_limit_of_the_unrolled_one(d):
    """IDKM's fixed-point gradient, for scalars and for vectors (a k d x k d adjoint). The
    points are four blobs, so that 200 rounds reach the fixed point."""
    gen = torch.Generator().manual_seed(3)
    blobs = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])[:, :d]
    x = (blobs[torch.randint(0, 4, (4000,), generator=gen)]
         + 0.7 * torch.randn(4000, d, generator=gen)).unsqueeze(0)
    c = 0.5 * kmeans(x, 4, torch.Generator().manual_seed(0), max_iter=5).centroids  # far off
    upstream = torch.randn(x.shape, generator=gen)
    unrolled_out, unrolled = _gradient(x, c, 0.1, 200, "unrolled", upstream)
    implicit_out, implicit = _gradient(x, c, 0.1, 200, "implicit", upstream)
    torch.testing.assert_close(implicit_out.weights, unrolled_out.weights)
    assert rel(implicit, unrolled) < 1e-4
    _, unrolled_3 = _gradient(x, c, 0.1, 3, "unrolled", upstream)
    _, implicit_3 = _gradient(x, c, 0.1, 3, "implicit", upstream)
    assert rel(implicit_3, unrolled_3) > 1e-3


def test_weighted_points_must_be_scalars():
    _, _, trajectory = weighted_dkm(torch.randn(1, 2, 10), torch.ones(1, 10),
                                    torch.randn(1, 2, 2), 1.0, max_iter=1, epsilon=0)
    with pytest.raises(ValueError, match="weighted points must be scalars; got d=2"):
        weighted_dkm_gradient(torch.randn(1, 2, 10), torch.ones(1, 10), trajectory,
                              torch.randn(1, 2, 10), 1.0)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_the_trajectory_counts_rounds_per_palette_on_every_path(epsilon, host_reads, grouped,
                                                                 implicit):
    """``trajectory.last`` is (P,) int64 on the points' device whether the stop is decided on
    the host or on the device, with or without groups; ``ran`` is the common count exactly
    where the host knows it (no early stop, or one decided there: for a single group, or for
    groups that all stopped at the same round)."""
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(3, 1, 500, generator=g)
    c0 = kmeans(xt.transpose(1, 2), 4, g, max_iter=1).centroids
    groups = Groups(torch.tensor([0, 1, 1]), 2) if grouped else None
    with sync_free() if not host_reads else torch.enable_grad():
        _, _, trajectory = weighted_dkm(xt, None, c0, 10.0, max_iter=4, epsilon=epsilon,
                                        implicit=implicit, groups=groups)
    assert trajectory.last.shape == (3,) and trajectory.last.dtype == torch.long
    assert trajectory.last.device == xt.device
    together = len(set(trajectory.last.tolist())) == 1
    known = epsilon == 0 or (host_reads and (not grouped or together))
    assert (trajectory.ran is not None) == known
    if known:
        assert trajectory.last.tolist() == [trajectory.ran] * 3


def test_a_batch_of_tensors_keeps_the_attention_each_would_keep_alone(monkeypatch):
    """The attention is kept for the backward while it fits ``KEEP_ATTENTION_MAX_ENTRIES`` per
    tensor: a batch of two tensors that each fit keeps it, as their own calls would (a single
    budget for the whole batch made a batched step recompute it, slower than the calls alone)."""
    import lightning_dkm.engine.weighted as weighted

    P, U, k, rounds = 2, 100, 4, 3
    monkeypatch.setattr(weighted, "KEEP_ATTENTION_MAX_ENTRIES", rounds * k * U)  # one palette
    xt = torch.randn(P, 1, U)
    c0 = torch.linspace(-1, 1, k).reshape(1, k, 1).expand(P, k, 1).contiguous()
    one_tensor = weighted.weighted_dkm(xt, torch.ones(P, U), c0, 10.0, max_iter=rounds,
                                       epsilon=0.0)[2]
    two_tensors = weighted.weighted_dkm(xt, torch.ones(P, U), c0, 10.0, max_iter=rounds,
                                        epsilon=0.0, groups=Groups(torch.arange(P), P))[2]
    assert one_tensor.kept is None  # 2 palettes of one tensor: over its budget
    assert two_tensors.kept is not None and two_tensors.kept.shape == (rounds, P, k, U)


def test_the_attention_is_a_softmax_with_weights_below_its_floor_exactly_zero():
    """``attention`` is softmax over the centroids, except that a weight below ``e^-LOGIT_FLOOR``
    of its point's largest is 0 (a saturated attention's far centroids otherwise underflow into
    subnormal numbers, which every op reading them pays for on x86); padding centroids stay 0."""
    import lightning_dkm.engine.weighted as weighted

    f32 = torch.float32
    xt = torch.linspace(-4, 4, 2001, dtype=f32).reshape(1, 1, -1)
    c = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=f32).reshape(1, 4, 1)
    tiny = torch.finfo(f32).tiny
    for inv_tau in (1.0, 30.0, 1e3):
        a = weighted.attention(xt, c, inv_tau)
        logits = -(xt - c).square() * inv_tau  # (1, 4, m)
        exact = torch.softmax(logits.double(), dim=1)
        below = logits - logits.amax(1, keepdim=True) < -weighted.LOGIT_FLOOR
        assert not ((a != 0) & (a.abs() < tiny)).any()
        assert torch.equal(a[below], torch.zeros_like(a[below]))
        torch.testing.assert_close(a[~below].double(), exact[~below], rtol=1e-5, atol=1e-30)
        if inv_tau == 1e3:
            assert below.any() and (torch.softmax(logits, 1)[below] != 0).any()  # it arises
    mask = torch.tensor([True, True, True, False]).reshape(1, 4, 1)
    a = weighted.attention(xt, c, 30.0, mask)
    assert torch.equal(a[:, 3], torch.zeros_like(a[:, 3]))
    torch.testing.assert_close(a.sum(1), torch.ones(1, xt.shape[2], dtype=f32))
