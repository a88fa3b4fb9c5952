"""Specification: a DKM training step reads nothing back from the device.

A read (``bool(t)``, ``t.item()``, ``nonzero``, ...) on an accelerator is a sync that stalls the
CPU until the device has caught up. This machine may have no GPU, so the reads are counted
with a CPU-side proxy (:func:`lightning_dkm.diagnostics.count_host_syncs`: every Python entry
point that forces one, wrapped), with the steps in the form they take on an accelerator
(:func:`lightning_dkm.engine.numerics.sync_free`); where CUDA exists,
``torch.cuda.set_sync_debug_mode("error")`` checks the real thing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lightning_dkm.engine.clustering_pass as clustering_pass_module
from lightning_dkm import ClusterSpec, PaletteLayout, attach, select_targets
from lightning_dkm.diagnostics import count_host_syncs, graph_breaks
from lightning_dkm.engine import native
from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.clustering_pass import clustering_pass
from lightning_dkm.engine.distinct import unique_dkm_batch, unique_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans_plusplus, lloyd
from lightning_dkm.engine.numerics import normalization_of, sync_free
from lightning_dkm.engine.parametrization import DKMParametrization
from lightning_dkm.engine.reference import dkm_cluster

# (implementation, cluster_dim, group_size, gradient); 256 x 256 weights: "auto" is "unique".
CASES = [
    ("reference", 1, None, "unrolled"),
    ("reference", 2, None, "unrolled"),
    ("chunked", 1, None, "unrolled"),
    ("chunked", 2, 64, "unrolled"),
    ("unique", 1, None, "unrolled"),
    ("unique", 1, 64, "unrolled"),
    ("unique", 1, None, "implicit"),
    ("auto", 1, None, "unrolled"),
]



def one_lloyd_step(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Centroids k-means++ seeds and one Lloyd step moves: DKM still moves them (the optimal
    ones that ``kmeans`` gives scalars would stop it at once)."""
    return lloyd(x, kmeans_plusplus(x, k, g), max_iter=1).centroids

def parametrized_weight(implementation: str, cluster_dim: int, group_size: int | None,
                        gradient: str, epsilon: float):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256, 256) * 0.05)
    spec = ClusterSpec(bits=4, cluster_dim=cluster_dim, group_size=group_size)
    p = DKMParametrization(PaletteLayout((256, 256), spec, name="fc"),
                           implementation=implementation, gradient=gradient, epsilon=epsilon)
    p.initialize(weight)
    return weight, p.train()


def training_step(weight: torch.Tensor, p: DKMParametrization) -> None:
    (p(weight) * torch.ones_like(weight)).sum().backward()


@pytest.mark.parametrize("epsilon", [1e-4, 0.0])
@pytest.mark.parametrize(("implementation", "cluster_dim", "group_size", "gradient"), CASES)
def test_a_soft_training_step_reads_nothing_back_from_the_device(
    implementation, cluster_dim, group_size, gradient, epsilon
) -> None:
    weight, p = parametrized_weight(implementation, cluster_dim, group_size, gradient, epsilon)
    with sync_free():
        training_step(weight, p)  # warm-up: nothing lazy is left
        with count_host_syncs() as log:
            training_step(weight, p)
    assert log.count == 0, log.calls


def test_a_hard_training_step_reads_nothing_back_from_the_device() -> None:
    weight, p = parametrized_weight("reference", 1, None, "unrolled", 1e-4)
    p.set_mode("hard")
    with count_host_syncs() as log:
        training_step(weight, p)
    assert log.count == 0, log.calls


def test_the_first_forward_of_an_initialised_parametrization_reads_no_flag() -> None:
    """``is_initialized`` is a Python flag: the first forward needs no read of the buffer."""
    weight, p = parametrized_weight("reference", 1, None, "unrolled", 0.0)
    with count_host_syncs() as log:
        p(weight)
    assert log.count == 0, log.calls


@pytest.mark.parametrize(("implementation", "fused", "expected"), [
    ("reference", True, 3), ("chunked", True, 3), ("unique", True, 5), ("unique", False, 7)])
def test_eagerly_on_cpu_the_steps_read_only_what_saves_work(implementation, fused,
                                                            expected) -> None:
    """The documented CPU reads, free there: the early-stop test per iteration (3), and for
    "unique" the distinct-value compaction (``nonzero``) and the rough std's fallback test;
    with PyTorch ops for the passes over the weights (``fused=False``: no native loops) also
    the two ``bincount`` s (forward and backward)."""
    if fused and native.loops_for() is None:
        pytest.skip(f"the native loops are not built here: {native.build_failure()}")
    weight, p = parametrized_weight(implementation, 1, None, "unrolled", 1e-4)
    with contextlib.nullcontext() if fused else native.turned_off():
        training_step(weight, p)
        with count_host_syncs() as log:
            training_step(weight, p)
    assert log.count == expected, log.calls


# -- the early stop decided on the device gives what the early exit gives ----------------------
STEPS = {"reference": dkm_cluster, "chunked": chunked_dkm_cluster, "unique": unique_dkm_cluster}


def stopping_epsilon(x: torch.Tensor, c: torch.Tensor, tau: float) -> float:
    """An epsilon at which the loop stops after its second iteration: between the largest
    centroid moves of the first and the second (in units of each palette's std)."""
    scale = normalization_of(x).scale
    c1 = dkm_cluster(x, c, tau, max_iter=1, epsilon=0.0).centroids
    c2 = dkm_cluster(x, c1, tau, max_iter=1, epsilon=0.0).centroids
    first, second = ((c1 - c) / scale).abs().amax(), ((c2 - c1) / scale).abs().amax()
    assert second < 0.75 * first
    return float(first + second) / 2


def run(step, x, c, tau, epsilon, **kwargs):
    x = x.clone().requires_grad_()
    out = step(x, c, tau, max_iter=3, epsilon=epsilon, **kwargs)
    (out.weights * torch.linspace(-1, 1, x.numel()).view(x.shape)).sum().backward()
    return out, x.grad


@pytest.mark.parametrize(("implementation", "P", "d", "kwargs"), [
    ("reference", 1, 1, {}),
    ("reference", 2, 2, {}),
    ("chunked", 2, 2, {"chunk": 1000}),
    ("unique", 1, 1, {}),
    ("unique", 3, 1, {}),
    ("unique", 1, 1, {"gradient": "implicit"}),
])
def test_the_early_stop_on_the_device_equals_the_early_exit(implementation, P, d, kwargs):
    """In float64, so that only a wrong round (not the summation order of the "unique"
    step's full code table) could make them differ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(P, 4096, d, generator=g, dtype=torch.float64)
    c = one_lloyd_step(x, 8, g)
    epsilon = stopping_epsilon(x, c, 1e-2)
    tau = torch.tensor(1e-2, dtype=torch.float64)  # a buffer, as in the parametrization
    exit_out, exit_grad = run(STEPS[implementation], x, c, tau, epsilon, **kwargs)
    with sync_free():
        device_out, device_grad = run(STEPS[implementation], x, c, tau, epsilon, **kwargs)
    assert exit_out.iterations == 2
    assert isinstance(device_out.iterations, torch.Tensor) and int(device_out.iterations) == 2
    tolerance = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(device_out.weights, exit_out.weights, **tolerance)
    torch.testing.assert_close(device_out.centroids, exit_out.centroids, **tolerance)
    torch.testing.assert_close(device_grad, exit_grad, **tolerance)


# -- torch.compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["reference", "chunked", "unique"])
def test_the_soft_training_forward_compiles_without_graph_breaks(implementation) -> None:
    weight, p = parametrized_weight(implementation, 1, None, "unrolled", 1e-4)
    result = graph_breaks(p, weight)
    assert result["breaks"] == 0, result["reasons"]


@pytest.mark.parametrize("implementation", ["reference", "chunked", "unique"])
def test_the_compiled_training_step_equals_the_eager_one(implementation) -> None:
    """One graph (``fullgraph=True``) through the custom autograd Functions, and the values,
    gradients and centroid update of the eager step (which, compiled or not, runs on the
    device-side path: ``sync_free`` for the eager one). A compiled graph runs PyTorch ops only;
    the eager CPU step's backward runs the core's C loops (:mod:`~lightning_dkm.engine.native`)
    where they are built, whose gradient agrees up to summation order (here 4e-5 of 1, while
    both are 2e-4 from the float64 gradient), and equals it with the loops off."""
    weight, p = parametrized_weight(implementation, 1, None, "unrolled", 1e-4)
    start = p.centroids.clone()
    eager_grads = []
    for loops_off in (True, False):
        p.centroids.copy_(start)
        with sync_free(), native.turned_off() if loops_off else contextlib.nullcontext():
            eager = p(weight)
            (eager_grad,) = torch.autograd.grad(eager.sum(), weight)
        eager_grads.append(eager_grad)
    eager_centroids = p.centroids.clone()
    p.centroids.copy_(start)
    torch._dynamo.reset()
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True)(weight)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grads[0])
    torch.testing.assert_close(compiled_grad, eager_grads[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.centroids, eager_centroids)


# -- the real check, where CUDA exists ----------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("epsilon", [1e-4, 0.0])
@pytest.mark.parametrize(("implementation", "cluster_dim", "group_size", "gradient"), CASES)
def test_on_cuda_a_soft_training_step_does_not_synchronize(
    implementation, cluster_dim, group_size, gradient, epsilon
) -> None:
    weight, p = parametrized_weight(implementation, cluster_dim, group_size, gradient, epsilon)
    weight, p = torch.nn.Parameter(weight.detach().cuda()), p.cuda()
    upstream = torch.ones_like(weight)
    (p(weight) * upstream).sum().backward()  # warm-up: CUDA context, allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (p(weight) * upstream).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert bool(torch.isfinite(weight.grad).all())


# -- several tensors batched, each with its own early stop ---------------------------------------
def batch_of_tensors():
    """Three tensors of different sizes, palettes, ``k`` and taus (one tau a device tensor,
    as a parametrization's buffer is), float64 so that only a wrong round could differ."""
    g = torch.Generator().manual_seed(0)
    xs, cs, taus = [], [], []
    for P, n, k, tau in [(1, 3000, 4, 0.01), (3, 1500, 16, 0.05), (2, 4000, 2, 0.02)]:
        x = torch.randn(P, n, 1, generator=g, dtype=torch.float64) * 0.03
        xs.append(x)
        cs.append(one_lloyd_step(x, k, g))
        taus.append(torch.tensor(tau, dtype=torch.float64) if k == 16 else tau)
    return xs, cs, taus


def batched_step(xs, cs, taus, gradient: str):
    """One forward and backward of the batch; at this epsilon the tensors stop after 4, 2
    and 5 of at most 6 rounds."""
    leaves = [x.clone().requires_grad_() for x in xs]
    outs = unique_dkm_batch(leaves, cs, taus, max_iter=6, epsilon=0.05, gradient=gradient)
    sum((o.weights * torch.linspace(-1, 1, o.weights.numel(), dtype=o.weights.dtype,
                                    device=o.weights.device).view(o.weights.shape)).sum()
        for o in outs).backward()
    return outs, [x.grad for x in leaves]


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_a_batched_step_with_an_early_stop_reads_nothing_back(gradient) -> None:
    xs, cs, taus = batch_of_tensors()
    with sync_free():
        batched_step(xs, cs, taus, gradient)  # warm-up: nothing lazy is left
        with count_host_syncs() as log:
            batched_step(xs, cs, taus, gradient)
    assert log.count == 0, log.calls


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_a_batched_early_stop_on_the_device_equals_the_host_read_one(gradient) -> None:
    """Each tensor stops at its own round (the counts differ), with the values, centroids and
    gradients of the eager CPU path, which reads the stop back."""
    xs, cs, taus = batch_of_tensors()
    host, host_grads = batched_step(xs, cs, taus, gradient)
    with sync_free():
        device, device_grads = batched_step(xs, cs, taus, gradient)
    counts = [int(o.iterations) for o in host]
    assert counts == [int(o.iterations) for o in device]
    assert len(set(counts)) > 1 and max(counts) < 6, counts  # each its own stop, all early
    tolerance = {"rtol": 1e-9, "atol": 1e-9}
    for h, d, hg, dg in zip(host, device, host_grads, device_grads, strict=True):
        torch.testing.assert_close(d.weights, h.weights, **tolerance)
        torch.testing.assert_close(d.centroids, h.centroids, **tolerance)
        torch.testing.assert_close(dg, hg, **tolerance)


def model_of_several_weights(gradient: str) -> torch.nn.Module:
    """Three "unique" weights of different sizes, bits and taus, with an early stop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 200), torch.nn.ReLU(),
                                torch.nn.Linear(200, 100))
    targets = select_targets(model, ClusterSpec(bits=3), min_size=0,
                             overrides={"2": {"bits": 2}, "4": {"bits": 4}})
    tensors = attach(model, targets, epsilon=1e-4, implementation="unique", gradient=gradient)
    for i, tensor in enumerate(tensors.values()):
        tensor.parametrization.set_temperature(0.01 * (i + 1))
    return model


def pass_step(model: torch.nn.Module) -> None:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    with clustering_pass(model):
        loss = model(x).square().mean()
    loss.backward()


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_a_clustering_pass_over_several_weights_reads_nothing_back(gradient,
                                                                   monkeypatch) -> None:
    """The whole pass (every weight in one batched call, as on an accelerator) with an epsilon."""
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_ENTRIES", 1 << 30)
    calls = []
    original = clustering_pass_module.unique_dkm_batch
    monkeypatch.setattr(clustering_pass_module, "unique_dkm_batch",
                        lambda xs, *a, **k: calls.append(len(xs)) or original(xs, *a, **k))
    model = model_of_several_weights(gradient)
    with sync_free():
        pass_step(model)  # warm-up
        with count_host_syncs() as log:
            pass_step(model)
    assert calls == [3, 3]
    assert log.count == 0, log.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_on_cuda_a_batched_step_with_an_early_stop_does_not_synchronize(gradient) -> None:
    xs, cs, taus = batch_of_tensors()
    xs, cs = [x.cuda() for x in xs], [c.cuda() for c in cs]
    taus = [torch.as_tensor(t, dtype=torch.float64).cuda() for t in taus]  # buffers, as trained
    batched_step(xs, cs, taus, gradient)  # warm-up: CUDA context, allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, grads = batched_step(xs, cs, taus, gradient)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(g).all()) for g in grads)


class _CountedHooks:
    """A DKMCallback's per-batch hooks, run under :func:`count_host_syncs`."""

    HOOKS = ("on_train_batch_start", "on_before_backward", "on_train_batch_end",
             "on_before_optimizer_step")

    def __init__(self, callback) -> None:
        self.reads: list[str] = []
        self.calls = 0
        for name in self.HOOKS:
            setattr(callback, name, self._counted(getattr(callback, name)))

    def _counted(self, hook):
        def counted(*args, **kwargs):
            with count_host_syncs() as log:
                hook(*args, **kwargs)
            self.reads.extend(log.calls)
            self.calls += 1
        return counted


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callbacks_batch_hooks_read_nothing_back(tmp_path, accumulate) -> None:
    """Setting every tensor's tau, opening and closing the pass and the accumulation window:
    nothing of it reads a tensor back (the DKM step itself is held to that above)."""
    from lightning_helpers import TinyNet, trainer

    from lightning_dkm import DKMCallback

    callback = DKMCallback(bits=2, finalize=False, log_histograms=False, verbose=False)
    counted = _CountedHooks(callback)
    trainer(tmp_path, max_epochs=1, limit_train_batches=4, accumulate_grad_batches=accumulate,
            callbacks=[callback]).fit(TinyNet(batch_size=8))
    assert counted.calls > 0 and counted.reads == []
