"""Specification of the clustering pass (lightning_dkm.engine.clustering_pass): inside one
forward, every soft 'unique' weight of the model is clustered by one batched DKM call, with the
values, gradients and centroids each weight would get on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dkm.engine.clustering_pass as clustering_pass_module
import lightning_dkm.engine.rebuild as rebuild_module
from lightning_dkm import ClusterSpec, attach, clustered_tensors, select_targets
from lightning_dkm.engine.clustering_pass import clustering_pass
from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.model.attach import set_mode


def _model(epsilon: float = 0.0, **spec) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(),
                          nn.Linear(200, 100))
    targets = select_targets(model, ClusterSpec(**{"bits": 3, **spec}), min_size=0)
    tensors = attach(model, targets, epsilon=epsilon, implementation="unique")
    for i, tensor in enumerate(tensors.values()):
        tensor.parametrization.set_temperature(0.01 * (i + 1))  # a tau of its own each
    return model


def _step(model: nn.Module, in_pass: bool):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    context = clustering_pass(model) if in_pass else torch.enable_grad()
    with context:
        loss = model(x).square().mean()
    loss.backward()
    tensors = clustered_tensors(model)
    return ({n: t.original.grad.clone() for n, t in tensors.items()},
            {n: t.parametrization.centroids.clone() for n, t in tensors.items()})


@pytest.fixture(autouse=True)
def _batch_every_size(monkeypatch):
    """These tests batch every weight, as on an accelerator (CPU batches only small ones)."""
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_ENTRIES", 1 << 30)


def test_a_pass_gives_each_weight_its_own_gradient_and_centroids():
    grads_pass, centroids_pass = _step(_model(), in_pass=True)
    grads_alone, centroids_alone = _step(_model(), in_pass=False)
    for name, alone in grads_alone.items():  # float32: the batch sums in another order
        scale = float(alone.abs().max())
        torch.testing.assert_close(grads_pass[name], alone, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(centroids_pass[name], centroids_alone[name])


exact_flags: list[list[bool]] = []


@pytest.fixture
def batch_calls(monkeypatch) -> list[int]:
    """How many calls a pass makes shows in no result (each weight gets what it would get
    alone), so the calls of the batched step are counted where the pass makes them: the
    number of tensors of each call, in order (and in ``exact_flags`` which joined on their
    exact weights)."""
    calls: list[int] = []
    exact_flags.clear()
    original = clustering_pass_module.unique_dkm_batch

    def counting(xs, *args, **kwargs):
        calls.append(len(xs))
        exact_flags.append(list(kwargs.get("exact") or [False] * len(xs)))
        return original(xs, *args, **kwargs)

    monkeypatch.setattr(clustering_pass_module, "unique_dkm_batch", counting)
    return calls


def test_a_pass_clusters_every_weight_in_one_call(batch_calls):
    _step(_model(), in_pass=True)
    assert batch_calls == [3]


def test_weights_with_other_settings_are_batched_apart(batch_calls):
    model = _model()
    next(iter(clustered_tensors(model).values())).parametrization.max_iter = 5
    _step(model, in_pass=True)
    assert sorted(batch_calls) == [1, 2]


def test_on_cpu_large_weights_run_alone_and_small_ones_together(monkeypatch, batch_calls):
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_ENTRIES", 20000 * 8)
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_TOTAL", 20000 * 8)
    _step(_model(), in_pass=True)  # 19,200 and 20,000 weights batched; 60,000 alone
    assert batch_calls == [2]


def test_on_cpu_a_small_model_is_one_batch_whatever_its_weights_sizes(monkeypatch, batch_calls):
    """Every weight is above the per-weight bound, all of them together within the total
    one."""
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_ENTRIES", 1)
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_TOTAL", 1 << 22)
    _step(_model(), in_pass=True)
    assert batch_calls == [3]
    monkeypatch.setattr(clustering_pass_module, "CPU_BATCH_MAX_TOTAL", 99_199 * 8)
    batch_calls.clear()
    _step(_model(), in_pass=True)  # one entry too many together: each its own step
    assert batch_calls == []


def _mixed_model(implementation: str = "auto") -> nn.Module:
    """``implementation="auto"``: the 19,200- and 20,000-weight layers on ``"unique"``, the
    1,000-weight head on ``"chunked"`` (below ``AUTO_UNIQUE_MIN_WEIGHTS``); with another
    ``implementation`` every layer on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    attach(model, select_targets(model, ClusterSpec(bits=3), min_size=0), epsilon=0.0,
           implementation=implementation)
    return model


def _assert_same_step(got, want) -> None:
    """Gradients and centroids of a pass against each weight's own step (float summation
    order apart)."""
    for name, alone in want[0].items():
        scale = float(alone.abs().max())
        torch.testing.assert_close(got[0][name], alone, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(got[1][name], want[1][name])


def test_a_small_weight_auto_gives_chunked_joins_the_batch_on_its_codes(batch_calls):
    """One call for all three; in the batch the head, whose own call ``"auto"`` gives the
    exact ``"chunked"`` step (mostly fixed cost alone), gets what the ``"unique"`` step on its
    float16 codes gives it."""
    steps = [t.parametrization.step_implementation
             for t in clustered_tensors(_mixed_model()).values()]
    assert steps == ["unique", "unique", "chunked"]
    in_pass = _step(_mixed_model(), in_pass=True)
    assert batch_calls == [3] and exact_flags == [[False, False, False]]
    _assert_same_step(in_pass, _step(_mixed_model("unique"), in_pass=False))


def test_a_small_weight_given_chunked_by_name_joins_on_its_exact_weights(batch_calls):
    """The head's ``"chunked"`` chosen by name (not by ``"auto"``): it joins the batch on its
    exact weights and gets what its own ``"chunked"`` step gives it."""
    def model() -> nn.Module:
        m = _mixed_model()
        head = clustered_tensors(m)["4.weight"].parametrization
        head.implementation = "chunked"  # as attach(..., implementation="chunked") sets it
        return m

    in_pass = _step(model(), in_pass=True)
    assert batch_calls == [3] and exact_flags == [[False, False, True]]
    _assert_same_step(in_pass, _step(model(), in_pass=False))


def test_chunked_weights_alone_run_their_own_step(batch_calls):
    """With no weight on its codes to join (here every one is on ``"chunked"``), a small
    weight runs its own step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    attach(model, select_targets(model, ClusterSpec(bits=3), min_size=0), epsilon=0.0)
    _step(model, in_pass=True)
    assert batch_calls == []


def test_eval_mode_is_untouched_by_a_pass():
    model = _model()
    x = torch.randn(4, 64)
    model.eval()
    with torch.no_grad():
        outside = model(x)
        with clustering_pass(model):
            inside = model(x)
    torch.testing.assert_close(inside, outside)


def test_hard_mode_is_untouched_by_a_pass():
    """Hard (straight-through) training steps are not batched: inside a pass they give the
    outside's outputs, gradients and centroids bit for bit."""
    results = []
    for in_pass in (True, False):
        model = _model()
        set_mode(model, "hard")
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
        with clustering_pass(model) if in_pass else torch.enable_grad():
            out = model(x)
        out.square().mean().backward()
        tensors = clustered_tensors(model)
        results.append((out.detach(), {n: t.original.grad for n, t in tensors.items()},
                        {n: t.parametrization.centroids for n, t in tensors.items()}))
    (inside, grads_inside, centroids_inside), (outside, grads_outside, centroids_outside) = results
    assert torch.equal(inside, outside)
    for name, grad in grads_outside.items():
        assert torch.equal(grads_inside[name], grad), name
        assert torch.equal(centroids_inside[name], centroids_outside[name]), name


def test_nothing_of_a_pass_outlives_it():
    model = _model()
    with clustering_pass(model) as current:
        model(torch.randn(2, 64)).sum().backward()
    assert len(current.members) == 3
    assert all(t.parametrization.pass_step is None
               for t in clustered_tensors(model).values())


# -- rebuild: the soft weights computed again in the backward instead of kept ---------------------


def _one_step(rebuild, rebuilt: list | None = None, monkeypatch=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 256))
    attach(model, select_targets(model, ClusterSpec(bits=3), min_size=0),
           implementation="unique", temperature=3e-2)
    if rebuilt is not None:  # count the rebuilds where the step makes them
        original = rebuild_module.rebuilt_soft_weights
        monkeypatch.setattr("lightning_dkm.engine.distinct.rebuilt_soft_weights",
                            lambda *a: rebuilt.append(1) or original(*a))
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    with clustering_pass(model, rebuild=rebuild):
        loss = model(x).square().mean()
    loss.backward()
    return model


def test_rebuilt_soft_weights_give_the_same_gradients_as_kept_ones(monkeypatch):
    rebuilt: list = []
    kept, recomputed = _one_step(False), _one_step(True, rebuilt, monkeypatch)
    # The second Linear's weight, rebuilt once in the backward (autograd does not save the
    # first one's: its input needs no gradient).
    assert len(rebuilt) == 1
    for (name, a), (_, b) in zip(kept.named_parameters(), recomputed.named_parameters(),
                                 strict=True):
        assert torch.equal(a.grad, b.grad), name
    for name, tensor in clustered_tensors(kept).items():
        other = clustered_tensors(recomputed)[name].parametrization.centroids
        assert torch.equal(tensor.parametrization.centroids, other), name


def test_by_default_only_weights_that_fsdp_shards_are_rebuilt(monkeypatch):
    rebuilt: list = []
    _one_step(None, rebuilt, monkeypatch)
    assert rebuilt == []  # plain tensors: kept, as before


def test_the_rebuild_of_the_unique_step_is_its_output_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(1, 50_000, 1, requires_grad=True)
    c0 = torch.linspace(-1.5, 1.5, 8).reshape(1, 8, 1)
    kept = unique_dkm_cluster(x, c0, 0.05)
    again = unique_dkm_cluster(x, c0, 0.05, rebuild=True)
    assert kept.rebuild is None and again.rebuild is not None
    assert torch.equal(again.rebuild(), again.weights.detach())
    assert torch.equal(again.weights, kept.weights)
    g = torch.randn_like(x)
    (grad_kept,) = torch.autograd.grad(kept.weights, x, g)
    (grad_again,) = torch.autograd.grad(again.weights, x, g)
    assert torch.equal(grad_again, grad_kept)
