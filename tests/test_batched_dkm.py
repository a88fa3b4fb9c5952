"""Specification of DKM batched across tensors (lightning_dkm.engine.distinct.unique_dkm_batch):
every palette of every tensor of a model in one call of the weighted core, as if each tensor had
been clustered on its own."""

from __future__ import annotations

import pytest
import torch

from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.distinct import unique_dkm_batch, unique_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import Normalization, normalization_of, sync_free


def _tensors():
    """Three tensors of different sizes, palettes, k and taus (one tau a device tensor)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 20000, 4, 0.01), (3, 5000, 16, 0.05), (2, 30000, 2, torch.tensor(0.02))]
    xs, cs, taus = [], [], []
    for P, n, k, tau in shapes:
        x = torch.randn(P, n, 1, generator=gen, dtype=torch.float64) * 0.03
        xs.append(x)
        cs.append(kmeans(x, k, torch.Generator().manual_seed(1), max_iter=5).centroids)
        taus.append(tau)
    return xs, cs, taus


def _run(step, xs, cs, taus, upstream, **kwargs):
    leaves = [x.clone().requires_grad_() for x in xs]
    outs = step(leaves, cs, taus, **kwargs)
    loss = sum((o.weights * g).sum() for o, g in zip(outs, upstream, strict=True) if g is not None)
    loss.backward()
    return outs, [x.grad for x in leaves]


def _one_by_one(xs, cs, taus, **kwargs):
    return [unique_dkm_cluster(x, c, t, **kwargs) for x, c, t in zip(xs, cs, taus, strict=True)]


def _assert_same(batched, alone, batched_grads, alone_grads):
    """Each tensor's soft weights, centroids and gradient equal, batched and on its own."""
    for b, a, gb, ga in zip(batched, alone, batched_grads, alone_grads, strict=True):
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.centroids, a.centroids, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, ga, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_a_batch_is_each_tensor_clustered_on_its_own(gradient):
    xs, cs, taus = _tensors()
    upstream = [torch.randn_like(x) for x in xs]
    kwargs = dict(max_iter=3, epsilon=0.0, gradient=gradient)
    batched, batched_grads = _run(unique_dkm_batch, xs, cs, taus, upstream, **kwargs)
    alone, alone_grads = _run(_one_by_one, xs, cs, taus, upstream, **kwargs)
    _assert_same(batched, alone, batched_grads, alone_grads)


def test_a_tensor_whose_output_is_unused_gets_no_gradient_and_changes_no_other():
    xs, cs, taus = _tensors()
    upstream = [torch.randn_like(xs[0]), None, torch.randn_like(xs[2])]
    _, grads = _run(unique_dkm_batch, xs, cs, taus, upstream, max_iter=3, epsilon=0.0)
    _, alone = _run(_one_by_one, [xs[0], xs[2]], [cs[0], cs[2]], [taus[0], taus[2]],
                    [upstream[0], upstream[2]], max_iter=3, epsilon=0.0)
    assert grads[1] is None
    torch.testing.assert_close(grads[0], alone[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[2], alone[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("epsilon", [0.0, 1e-4])
def test_without_host_reads_the_batch_gives_the_compact_result(epsilon):
    xs, cs, taus = _tensors()
    upstream = [torch.randn_like(x) for x in xs]
    compact, compact_grads = _run(unique_dkm_batch, xs, cs, taus, upstream, max_iter=3,
                                  epsilon=epsilon)
    with sync_free():
        full, full_grads = _run(unique_dkm_batch, xs, cs, taus, upstream, max_iter=3,
                                epsilon=epsilon)
    for a, b, ga, gb in zip(full, compact, full_grads, compact_grads, strict=True):
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_without_host_reads_a_batch_shares_one_layout_and_gives_each_tensor_its_own_result(
        gradient):
    """On an accelerator a batch's palettes share one distinct-value layout (fewer kernel
    launches); each tensor still gets what it gets alone, also one whose output is unused."""
    xs, cs, taus = _tensors()
    upstream = [torch.randn_like(xs[0]), None, torch.randn_like(xs[2])]
    kwargs = dict(max_iter=3, epsilon=0.0, gradient=gradient)
    with sync_free():
        batched, batched_grads = _run(unique_dkm_batch, xs, cs, taus, upstream, **kwargs)
        alone = _one_by_one(xs, cs, taus, **kwargs)
        _, alone_grads = _run(_one_by_one, [xs[0], xs[2]], [cs[0], cs[2]],
                              [taus[0], taus[2]], [upstream[0], upstream[2]], **kwargs)
    assert batched_grads[1] is None
    _assert_same([batched[0], batched[2]], [alone[0], alone[2]],
                 [batched_grads[0], batched_grads[2]], alone_grads)
    torch.testing.assert_close(batched[1].weights, alone[1].weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched[1].centroids, alone[1].centroids, rtol=1e-10, atol=1e-12)


def test_without_host_reads_a_shared_layout_holds_tensors_past_65536_weights_and_rebuilds():
    """A batch of float32 tensors, one wider than the 65,536 columns of the layout and two
    narrower, two of them rebuilding their soft weights in the backward: each gets what it
    gets alone."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(P, n, 1, generator=gen) * 0.02 for P, n in ((1, 20000), (3, 5000),
                                                                  (2, 70000))]
    cs = [kmeans(x, k, torch.Generator().manual_seed(1), max_iter=5).centroids
          for x, k in zip(xs, (4, 16, 2), strict=True)]
    taus = [0.01, 0.05, 0.02]
    upstream = [torch.randn_like(x) for x in xs]
    kwargs = dict(max_iter=3, epsilon=1e-4)
    with sync_free():
        batched, batched_grads = _run(unique_dkm_batch, xs, cs, taus, upstream,
                                      rebuild=[True, False, True], **kwargs)
        alone, alone_grads = _run(_one_by_one, xs, cs, taus, upstream, **kwargs)
    # float32: the batch's scale rounds its second moment over the layout's padding columns
    # (the docstring of prepare_shared), and 1 / tau amplifies that rounding in the soft
    # weights: 3e-5 of the largest weight and of the largest gradient on an AVX-512 CPU (the
    # step alone is 5e-6 from float64 there). Tolerances in units of each tensor's own scale.
    for b, a, gb, ga in zip(batched, alone, batched_grads, alone_grads, strict=True):
        weight_scale, grad_scale = float(a.weights.abs().max()), float(ga.abs().max())
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-5, atol=1e-4 * weight_scale)
        torch.testing.assert_close(b.centroids, a.centroids, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * grad_scale)


def test_without_host_reads_a_given_normalization_keeps_its_tensor_in_a_layout_of_its_own():
    """A tensor normalised by given constants (shard-local DKM's) is laid out on its own."""
    xs, cs, taus = _tensors()
    norms = [normalization_of(xs[0]), None, None]
    upstream = [torch.randn_like(x) for x in xs]
    with sync_free():
        batched, batched_grads = _run(unique_dkm_batch, xs, cs, taus, upstream, max_iter=3,
                                      epsilon=0.0, normalizations=norms)
        alone = [unique_dkm_cluster(x, c, t, max_iter=3, epsilon=0.0, normalization=n)
                 for x, c, t, n in zip(xs, cs, taus, norms, strict=True)]
    torch.testing.assert_close(batched[0].weights, alone[0].weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched[2].centroids, alone[2].centroids, rtol=1e-10,
                               atol=1e-12)
    assert all(g is not None for g in batched_grads)


def test_each_tensor_of_a_batch_stops_early_on_its_own():
    """With an epsilon a tensor that has converged stops as it would alone, while the batch
    runs on for the others: same results, its own iteration count."""
    xs, cs, taus = _tensors()
    converged = unique_dkm_cluster(xs[0], cs[0], taus[0], max_iter=50, epsilon=0.0).centroids
    starts = [converged, cs[1]]
    alone = [unique_dkm_cluster(x, c, t, max_iter=5, epsilon=1e-3)
             for x, c, t in zip(xs[:2], starts, taus[:2], strict=True)]
    upstream = [torch.randn_like(x) for x in xs[:2]]
    batch, grads = _run(unique_dkm_batch, xs[:2], starts, taus[:2], upstream, max_iter=5,
                        epsilon=1e-3)
    _, alone_grads = _run(_one_by_one, xs[:2], starts, taus[:2], upstream, max_iter=5,
                          epsilon=1e-3)
    assert int(alone[0].iterations) == int(batch[0].iterations) == 1
    assert int(batch[1].iterations) == int(alone[1].iterations) > 1
    _assert_same(batch, alone, grads, alone_grads)


def test_a_batch_whose_tensors_stop_together_counts_on_the_host_as_each_alone():
    """On CPU (host reads free) a batch whose tensors all stop at the same round knows its
    count on the host, as each tensor's own call does (its rounds are then picked as views),
    with the same results."""
    xs, cs, taus = _tensors()
    xs, cs, taus = [xs[0], xs[2]], [cs[0], cs[2]], [taus[0], taus[2]]
    starts = [unique_dkm_cluster(x, c, t, max_iter=50, epsilon=0.0).centroids
              for x, c, t in zip(xs, cs, taus, strict=True)]  # both converged
    upstream = [torch.randn_like(x) for x in xs]
    batch, grads = _run(unique_dkm_batch, xs, starts, taus, upstream, max_iter=5, epsilon=1e-3)
    alone, alone_grads = _run(_one_by_one, xs, starts, taus, upstream, max_iter=5,
                              epsilon=1e-3)
    assert [o.iterations for o in batch] == [o.iterations for o in alone] == [1, 1]
    assert all(isinstance(o.iterations, int) for o in batch)
    _assert_same(batch, alone, grads, alone_grads)


def test_mismatched_arguments_are_refused_naming_the_counts():
    xs, cs, taus = _tensors()
    with pytest.raises(ValueError, match="got 3 tensors, 2 centroids, 3 taus"):
        unique_dkm_batch(xs, cs[:2], taus)
    with pytest.raises(ValueError, match="cluster_dim 1; got 2"):
        unique_dkm_batch([torch.randn(1, 100, 2)], [torch.randn(1, 4, 2)], [0.1])


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_a_tensor_on_its_exact_weights_gets_what_the_chunked_step_gives_it(gradient):
    """``exact``: a tensor of the batch clustered on its exact weights, each its own point of
    count 1 (what ``implementation="auto"`` gives a small tensor joins the batch instead of a
    call of its own); listed anywhere in the batch."""
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 5_000, 1, generator=generator) * 0.05 + 0.01,
          torch.randn(1, 70_000, 1, generator=generator) * 0.02,
          torch.randn(1, 3_000, 1, generator=generator)]
    cs = [torch.sort(torch.randn(x.shape[0], k, 1, generator=generator) * x.std(), dim=1).values
          for x, k in zip(xs, (4, 16, 8), strict=True)]
    taus = [0.02, 0.01, 0.05]
    gs = [torch.randn(x.shape, generator=generator) for x in xs]
    inputs = [x.clone().requires_grad_() for x in xs]
    outs = unique_dkm_batch(inputs, cs, taus, epsilon=0.0, gradient=gradient,
                            exact=[True, False, True])
    sum((o.weights * g).sum() for o, g in zip(outs, gs, strict=True)).backward()
    for t in (0, 2):
        x = xs[t].clone().requires_grad_()
        alone = chunked_dkm_cluster(x, cs[t], taus[t], epsilon=0.0, gradient=gradient)
        (alone.weights * gs[t]).sum().backward()
        torch.testing.assert_close(outs[t].weights, alone.weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[t].centroids, alone.centroids)
        assert outs[t].iterations == alone.iterations
        # float32 summation order: the chunked step alone is 2.5e-5 of the largest gradient
        # from float64 on this problem (AVX-512 CPU), the batch as close; the implicit solve
        # amplifies the rounding further
        scale = float(x.grad.abs().max())
        tolerance = 1e-4 if gradient == "unrolled" else 2e-3
        torch.testing.assert_close(inputs[t].grad, x.grad, rtol=tolerance, atol=tolerance * scale)
    coded = unique_dkm_batch([xs[1]], cs[1:2], taus[1:2], epsilon=0.0, gradient=gradient)[0]
    torch.testing.assert_close(outs[1].weights, coded.weights, rtol=1e-5, atol=1e-7)


def test_exact_tensors_need_a_tensor_on_its_codes_and_no_normalization():
    x = torch.randn(1, 3_000, 1)
    c = torch.linspace(-1, 1, 4).reshape(1, 4, 1)
    with pytest.raises(ValueError, match="at least one tensor of the batch must be on its codes"):
        unique_dkm_batch([x, x], [c, c], [0.01, 0.01], exact=[True, True])
    with pytest.raises(ValueError, match="one flag per tensor"):
        unique_dkm_batch([x, x], [c, c], [0.01, 0.01], exact=[True])
    norm = Normalization(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="no normalization and no rebuild"):
        unique_dkm_batch([x, x], [c, c], [0.01, 0.01], normalizations=[norm, norm],
                         exact=[False, True])
    with pytest.raises(ValueError, match="no normalization and no rebuild"):
        unique_dkm_batch([x, x], [c, c], [0.01, 0.01], rebuild=[False, True],
                         exact=[False, True])


def _operator_calls(fn) -> int:
    """The operator calls ``fn()`` makes (a dispatch mode sees each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return len(calls)


@pytest.mark.parametrize("palettes", [1, 3])
def test_a_batchs_temperatures_and_groups_cost_the_same_calls_for_4_or_40_tensors(palettes):
    """Per step a batch gives every palette its tensor's ``1 / tau`` and group: from the
    callback's tau buffers (0-dim tensors) in a fixed number of operator calls, not a few per
    tensor (#22's lean step), with the values of each tensor's own
    :func:`~lightning_dkm.engine.numerics.inverse_temperature` bit for bit, and the groups'
    ids known on the host too (the early stop reads nothing back)."""
    from lightning_dkm.engine.numerics import (
        Groups,
        inverse_temperature,
        palette_inverse_temperatures,
    )

    def batch(T):
        taus = [torch.tensor(0.3 + 0.01 * t) for t in range(T)]
        sizes = [palettes + t % 2 for t in range(T)]
        return taus, sizes

    calls = []
    for T in (4, 40):
        taus, sizes = batch(T)
        calls.append(_operator_calls(lambda taus=taus, sizes=sizes: (
            palette_inverse_temperatures(taus, sizes, torch.float32, torch.device("cpu")),
            Groups.of_sizes(sizes, torch.device("cpu")))))
        inverse = palette_inverse_temperatures(taus, sizes, torch.float32, torch.device("cpu"))
        want = torch.cat([inverse_temperature(t).reshape(1).expand(p)
                          for t, p in zip(taus, sizes, strict=True)])
        assert torch.equal(inverse.view(-1), want) and inverse.shape == (sum(sizes), 1, 1)
        groups = Groups.of_sizes(sizes, torch.device("cpu"))
        assert groups.ids.tolist() == list(groups.host) == [
            t for t, p in enumerate(sizes) for _ in range(p)]
    assert calls[0] == calls[1] <= 16, calls
    # taus given as numbers (or a mix) still work, one conversion each
    mixed = palette_inverse_temperatures([0.3, torch.tensor(0.7)], [2, 1], torch.float32,
                                         torch.device("cpu"))
    one = torch.as_tensor(inverse_temperature(0.3), dtype=torch.float32)
    assert torch.equal(mixed.view(-1), torch.stack([one, one,
                                                    inverse_temperature(torch.tensor(0.7))]))


def test_the_batchs_root_mean_squares_are_each_tensors_own_with_one_power_of_two_call():
    """The spread of every palette of a batch where the rough one cancels (and everywhere
    without host reads): each tensor's :func:`~lightning_dkm.engine.numerics.root_mean_square`
    bit for bit, weights of 1e20 and 1e-25 and an all-zero palette included, with the powers
    of two of the whole batch in one call."""
    from unittest import mock

    from lightning_dkm.engine import numerics

    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 7001, generator=gen) * 0.02 + 5, torch.randn(3, 400, generator=gen) * 1e20,
          torch.randn(2, 300, generator=gen) * 1e-25, torch.zeros(1, 50)]
    deviations = [x - x.mean(1, keepdim=True) for x in xs]
    want = torch.cat([numerics.root_mean_square(d) for d in deviations])
    with mock.patch.object(numerics, "power_of_two", wraps=numerics.power_of_two) as spy:
        got = numerics.root_mean_squares(deviations)
    assert torch.equal(got, want) and spy.call_count == 1
