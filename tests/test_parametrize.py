"""Specification of DKMParametrization and of attaching it to a model."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_dkm import ClusterSpec, PaletteLayout, attach, clustered_tensors, select_targets
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import hard_assign
from lightning_dkm.engine.parametrization import DKMParametrization, stable_seed
from lightning_dkm.engine.reference import soft_assignment
from lightning_dkm.model.attach import set_mode, set_temperature


def clustered_linear(
    bits: int = 2, cluster_dim: int = 1, group_size: int | None = None, **kwargs
) -> tuple[nn.Linear, DKMParametrization]:
    """A Linear(16, 8) whose weight is clustered; weights ~ N(0, 0.05^2) like a trained layer."""
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    layout = PaletteLayout((8, 16), ClusterSpec(bits, cluster_dim, group_size), name="weight")
    parametrization = DKMParametrization(layout, **kwargs)
    parametrization.initialize(linear.weight)
    parametrize.register_parametrization(linear, "weight", parametrization)
    return linear, parametrization


def snapped_weight(linear: nn.Linear, parametrization: DKMParametrization) -> torch.Tensor:
    layout = parametrization.layout
    x = layout.to_palettes(linear.parametrizations.weight.original.detach())
    return layout.from_palettes(hard_assign(x, parametrization.centroids)[1])


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# -- buffers updated in place --------------------------------------------------------------------
def test_set_temperature_updates_the_buffer_in_place() -> None:
    _, p = clustered_linear()
    buffer, ptr = p.temperature, p.temperature.data_ptr()
    p.set_temperature(0.125)
    assert p.temperature is buffer and p.temperature.data_ptr() == ptr
    assert p.temperature.item() == 0.125


def test_a_soft_training_forward_moves_the_centroids_in_place() -> None:
    linear, p = clustered_linear(temperature=0.5)
    centroids_ptr, tau_ptr = p.centroids.data_ptr(), p.temperature.data_ptr()
    before = p.centroids.clone()
    linear.train()
    _ = linear.weight
    assert p.centroids.data_ptr() == centroids_ptr and p.temperature.data_ptr() == tau_ptr
    assert not torch.equal(p.centroids, before)
    assert p.temperature.item() == 0.5


def test_an_eval_forward_leaves_the_centroids_alone() -> None:
    linear, p = clustered_linear(temperature=0.5)
    before = p.centroids.clone()
    linear.eval()
    _ = linear.weight
    assert torch.equal(p.centroids, before)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_set_temperature_rejects_a_non_positive_or_non_finite_tau(tau: float) -> None:
    _, p = clustered_linear()
    with pytest.raises(
        ValueError, match=rf"weight: temperature must be a finite number > 0; got {tau}"
    ):
        p.set_temperature(tau)


def test_attach_refuses_an_infinite_epsilon_before_registering_anything() -> None:
    # Before: attach(epsilon=inf) registered DKM whose loop always stopped after one iteration.
    model = nn.Sequential(nn.Linear(64, 64))
    targets = select_targets(model, ClusterSpec(bits=2), min_size=0)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number >= 0; got inf"):
        attach(model, targets, epsilon=float("inf"))
    assert not clustered_tensors(model)


def test_bad_constructor_arguments_are_rejected_naming_them() -> None:
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2), name="fc.weight")
    with pytest.raises(ValueError, match="max_iter must be an int >= 1; got 0"):
        DKMParametrization(layout, max_iter=0)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number >= 0; got -0\.1"):
        DKMParametrization(layout, epsilon=-0.1)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number >= 0; got inf"):
        DKMParametrization(layout, epsilon=float("inf"))
    with pytest.raises(ValueError, match=r"fc\.weight: temperature must be .* got 0\.0"):
        DKMParametrization(layout, temperature=0)
    with pytest.raises(ValueError, match=r"fc\.weight: mode must be one of .* got 'fast'"):
        DKMParametrization(layout, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"chunk must be an int >= 1; got 0"):
        DKMParametrization(layout, chunk=0)
    with pytest.raises(ValueError, match=r"implementation must be 'auto' or one of \('reference', "
                       r"'chunked', 'unique'\); got 'fast'"):
        DKMParametrization(layout, implementation="fast")  # type: ignore[arg-type]
    vectors = PaletteLayout((8, 16), ClusterSpec(bits=2, cluster_dim=2), name="fc.weight")
    with pytest.raises(ValueError, match=r"fc\.weight: implementation='unique' needs cluster_dim "
                       r"1; got 2 \(use 'chunked'\)"):
        DKMParametrization(vectors, implementation="unique")
    with pytest.raises(ValueError, match=r"fc\.weight: gradient='implicit' .* got "
                       r"implementation='reference'"):
        DKMParametrization(layout, implementation="reference", gradient="implicit")


# -- modes ---------------------------------------------------------------------------------------
def test_eval_gives_the_hard_snapped_weight_bit_for_bit() -> None:
    linear, p = clustered_linear(bits=4, temperature=0.5)
    linear.eval()
    weight = linear.weight
    assert torch.equal(weight, snapped_weight(linear, p))
    assert torch.unique(weight).numel() <= 16


def test_eval_with_vectors_and_groups_gives_the_snapped_weight() -> None:
    linear, p = clustered_linear(bits=2, cluster_dim=2, group_size=4)
    linear.eval()
    assert torch.equal(linear.weight, snapped_weight(linear, p))


def test_soft_training_weight_is_differentiable_and_close_to_the_snapped_weight() -> None:
    linear, p = clustered_linear(bits=3, temperature=1e-6)
    linear.train()
    weight = linear.weight
    weight.sum().backward()
    original = linear.parametrizations.weight.original
    assert original.grad is not None and bool(torch.isfinite(original.grad).all())
    torch.testing.assert_close(weight.detach(), snapped_weight(linear, p))


def test_mode_off_is_the_identity() -> None:
    linear, p = clustered_linear()
    p.set_mode("dense")
    before = p.centroids.clone()
    for train in (True, False):
        linear.train(train)
        assert torch.equal(linear.weight, linear.parametrizations.weight.original)
    assert torch.equal(p.centroids, before)


def test_mode_hard_forward_is_the_snapped_weight_with_an_identity_gradient() -> None:
    linear, p = clustered_linear(bits=3, mode="hard")
    expected = snapped_weight(linear, p)  # from the centroids before the forward moves them
    linear.train()
    weight = linear.weight
    assert torch.equal(weight.detach(), expected)
    upstream = torch.randn_like(weight)
    (weight * upstream).sum().backward()
    assert torch.equal(linear.parametrizations.weight.original.grad, upstream)


def test_mode_hard_training_moves_centroids_to_the_mean_of_their_members() -> None:
    linear, p = clustered_linear(bits=2, mode="hard")
    with torch.no_grad():
        p.centroids.add_(0.01)  # off the k-means fixed point
    x = p.layout.to_palettes(linear.parametrizations.weight.original.detach())
    idx, _ = hard_assign(x, p.centroids)
    expected = torch.stack([x[0, idx[0] == j].mean(0) for j in range(4)]).unsqueeze(0)
    linear.train()
    _ = linear.weight
    torch.testing.assert_close(p.centroids, expected)


def test_set_mode_rejects_unknown_modes() -> None:
    _, p = clustered_linear()
    expected = r"mode must be one of \('soft', 'hard', 'dense'\); got 'x'"
    with pytest.raises(ValueError, match=expected):
        p.set_mode("x")  # type: ignore[arg-type]


# -- initialisation ------------------------------------------------------------------------------
def test_initialize_with_the_same_seed_gives_the_same_centroids() -> None:
    weight = torch.randn(8, 16)
    layout = PaletteLayout((8, 16), ClusterSpec(bits=3, cluster_dim=2))
    a, b, c = (DKMParametrization(layout, seed=s) for s in (7, 7, 8))
    for p in (a, b, c):
        p.initialize(weight)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    assert bool(a.initialized)


def test_an_uninitialized_parametrization_initializes_on_its_first_forward() -> None:
    weight = torch.randn(8, 16)
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2))
    lazy, eager = DKMParametrization(layout, seed=3), DKMParametrization(layout, seed=3)
    assert not bool(lazy.initialized)
    eager.initialize(weight)
    lazy.eval()
    out = lazy(weight)
    assert bool(lazy.initialized)
    assert torch.equal(lazy.centroids, eager.centroids)
    assert torch.unique(out).numel() <= 4


def test_is_initialized_follows_initialize() -> None:
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2))
    p = DKMParametrization(layout)
    assert p.is_initialized is False
    p.initialize(torch.randn(8, 16))
    assert p.is_initialized is True and bool(p.initialized)


def test_set_centroids_starts_from_given_centroids_and_marks_them_initialised() -> None:
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2))
    p = DKMParametrization(layout)
    given = torch.tensor([-0.2, -0.05, 0.05, 0.2]).reshape(1, 4, 1)
    p.set_centroids(given.double())
    assert p.is_initialized is True and bool(p.initialized)
    assert p.centroids.dtype == torch.float32 and torch.equal(p.centroids, given)
    snapped = p.palette(torch.full((8, 16), 0.19)).weight()
    assert torch.allclose(snapped, torch.full((8, 16), 0.2))


def test_set_centroids_rejects_a_wrong_shape_or_non_finite_values() -> None:
    p = DKMParametrization(PaletteLayout((8, 16), ClusterSpec(bits=2), name="fc.weight"))
    with pytest.raises(ValueError, match=r"fc\.weight: centroids must have shape \(1, 4, 1\)"):
        p.set_centroids(torch.zeros(1, 8, 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        p.set_centroids(torch.tensor([0.0, 1.0, float("nan"), 2.0]).reshape(1, 4, 1))
    assert p.is_initialized is False


def test_is_initialized_follows_a_loaded_state_dict_both_ways() -> None:
    linear, initialised = clustered_linear()
    fresh = DKMParametrization(initialised.layout)
    fresh.load_state_dict(initialised.state_dict())
    assert fresh.is_initialized is True
    assert torch.equal(fresh.centroids, initialised.centroids)
    # through the parametrized module too (the path of a Lightning checkpoint)
    target = nn.Linear(16, 8)
    parametrize.register_parametrization(
        target, "weight", DKMParametrization(initialised.layout), unsafe=True
    )
    target.load_state_dict(linear.state_dict())
    assert target.parametrizations.weight[0].is_initialized is True
    initialised.load_state_dict(DKMParametrization(initialised.layout).state_dict())
    assert initialised.is_initialized is False


def test_palette_of_uninitialised_centroids_raises_naming_the_tensor() -> None:
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2), name="fc.weight")
    message = r"fc\.weight: .*never initialised.*initialize\(weight\)"
    with pytest.raises(RuntimeError, match=message):
        DKMParametrization(layout).palette(torch.randn(8, 16))


def test_finalize_refuses_to_snap_to_uninitialised_centroids() -> None:
    from lightning_dkm import finalize

    model = small_model()
    targets = select_targets(model, ClusterSpec(bits=2), min_size=1)
    attach(model, targets, initialize=False, mode="dense")
    with pytest.raises(RuntimeError, match="never initialised"):
        finalize(model)


def test_initialize_rejects_weights_it_cannot_cluster() -> None:
    layout = PaletteLayout((8, 16), ClusterSpec(bits=2), name="fc.weight")
    weight = torch.randn(8, 16)
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fc\.weight: weight contains NaN"):
        DKMParametrization(layout).initialize(weight)


@pytest.mark.parametrize("wave_weights", [None, 200])  # all at once; about one a batch
def test_initialize_many_gives_each_the_centroids_of_its_own_initialize(monkeypatch,
                                                                        wave_weights) -> None:
    import lightning_dkm.engine.kmeans as kmeans_module
    from lightning_dkm.engine.parametrization import initialize_many

    if wave_weights is not None:
        monkeypatch.setattr(kmeans_module, "WAVE_WEIGHTS", wave_weights)
    g = torch.Generator().manual_seed(5)
    specs = [ClusterSpec(bits=2), ClusterSpec(bits=4), ClusterSpec(bits=3, cluster_dim=2),
             ClusterSpec(bits=2), ClusterSpec(bits=2, per_channel_scale=True),
             ClusterSpec(bits=2, group_size=4)]
    shapes = [(8, 16), (16, 24), (8, 16), (4, 4), (8, 16), (8, 16)]
    weights = [torch.randn(shape, generator=g) * s for shape, s in zip(shapes, (1, 1e-3, 2, 5, 1,
                                                                              1), strict=True)]
    weights[3] = torch.tensor([0.5, -0.5]).repeat(8).reshape(4, 4)  # fewer values than 2**bits
    layouts = [PaletteLayout(shape, spec, name=f"t{i}.weight")
               for i, (shape, spec) in enumerate(zip(shapes, specs, strict=True))]
    alone = [DKMParametrization(layout, seed=i) for i, layout in enumerate(layouts)]
    together = [DKMParametrization(layout, seed=i) for i, layout in enumerate(layouts)]
    with pytest.warns(UserWarning, match="t3.weight"):  # each tensor's own warning, named
        for p, weight in zip(alone, weights, strict=True):
            p.initialize(weight)
    with pytest.warns(UserWarning, match="t3.weight"):
        initialize_many([(p, lambda weight=weight: weight)
                         for p, weight in zip(together, weights, strict=True)])
    for a, b in zip(alone, together, strict=True):
        assert b.is_initialized
        assert torch.equal(a.centroids, b.centroids), a.layout.name
        if a.scale is not None:
            assert torch.equal(a.scale, b.scale)


def test_attach_seeds_nothing_when_one_weight_cannot_be_clustered() -> None:
    model = small_model()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    targets = select_targets(model, ClusterSpec(bits=2), min_size=1)
    with pytest.raises(ValueError, match="NaN"):
        attach(model, targets)
    assert clustered_tensors(model) == {}  # not half of them registered


def test_stable_seed_depends_only_on_the_base_seed_and_the_name() -> None:
    assert stable_seed(0, "fc.weight") == stable_seed(0, "fc.weight")
    assert stable_seed(0, "fc.weight") != stable_seed(1, "fc.weight")
    assert stable_seed(0, "fc.weight") != stable_seed(0, "fc2.weight")
    assert 0 <= stable_seed(2**70, "x") < 2**63


# -- state, optimizers, inspection ---------------------------------------------------------------
def test_state_dict_holds_centroids_temperature_and_initialized() -> None:
    linear, p = clustered_linear(temperature=0.25)
    state = linear.state_dict()
    prefix = "parametrizations.weight.0."
    assert torch.equal(state[prefix + "centroids"], p.centroids)
    assert state[prefix + "temperature"].item() == 0.25
    assert bool(state[prefix + "initialized"])
    assert "parametrizations.weight.original" in state


def test_loading_a_state_dict_restores_the_clustered_model() -> None:
    source, _ = clustered_linear(bits=3)
    target, q = clustered_linear(bits=3)
    target.load_state_dict(source.state_dict())
    source.eval()
    target.eval()
    assert torch.equal(target.weight, source.weight)
    assert torch.equal(q.centroids, source.parametrizations.weight[0].centroids)


def test_an_optimizer_built_before_attach_still_updates_the_original_parameter() -> None:
    model = small_model()
    parameter = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))
    assert clustered_tensors(model)["0.weight"].original is parameter
    before = parameter.detach().clone()
    model(torch.randn(4, 16)).square().sum().backward()
    optimizer.step()
    assert parameter.grad is not None
    assert not torch.equal(parameter.detach(), before)


def test_attach_of_vectors_with_the_same_seed_gives_the_same_centroids_on_two_copies() -> None:
    model = small_model()
    copies = [copy.deepcopy(model) for _ in range(3)]
    spec = ClusterSpec(bits=3, cluster_dim=2)
    for m, seed in zip(copies, (5, 5, 6), strict=True):
        attach(m, select_targets(m, spec, min_size=0), seed=seed)
    a, b, c = (clustered_tensors(m) for m in copies)
    for name in ("0.weight", "2.weight"):
        assert torch.equal(a[name].parametrization.centroids, b[name].parametrization.centroids)
        assert not torch.equal(a[name].parametrization.centroids, c[name].parametrization.centroids)


def test_attach_seeds_scalar_palettes_with_the_optimal_centroids_whatever_the_seed() -> None:
    model = small_model()
    copies = [copy.deepcopy(model) for _ in range(2)]
    for m, seed in zip(copies, (5, 6), strict=True):
        attach(m, select_targets(m, ClusterSpec(bits=3), min_size=0), seed=seed)
    a, b = (clustered_tensors(m) for m in copies)
    for name in ("0.weight", "2.weight"):
        centroids = a[name].parametrization.centroids
        assert torch.equal(centroids, b[name].parametrization.centroids)
        weight = model.get_parameter(name).detach()
        optimal = kmeans(weight.reshape(1, -1, 1), 8).centroids
        assert torch.equal(centroids, optimal)


def test_attach_is_idempotent() -> None:
    model = small_model()
    targets = select_targets(model, ClusterSpec(bits=2), min_size=0)
    first = attach(model, targets)
    second = attach(model, targets)
    assert first.keys() == second.keys() == {"0.weight", "2.weight"}
    for name in first:
        assert first[name].parametrization is second[name].parametrization
        assert len(model.get_submodule(name.split(".")[0]).parametrizations.weight) == 1


def test_attach_rejects_non_floating_and_non_finite_weights_naming_them() -> None:
    model = small_model()
    targets = select_targets(model, ClusterSpec(bits=2), min_size=0)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2\.weight: weight contains NaN or Inf"):
        attach(model, targets)
    model = small_model()
    model[0].weight = nn.Parameter(torch.zeros(32, 16, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match=r"0\.weight: only floating-point .* got torch\.int32"):
        attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))


def test_model_level_temperature_and_mode_reach_every_or_only_the_named_tensors() -> None:
    model = small_model()
    found = attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))
    set_temperature(model, 0.3)
    set_mode(model, "hard", names=["2.weight"])
    assert all(t.parametrization.temperature.item() == pytest.approx(0.3) for t in found.values())
    assert found["0.weight"].parametrization.mode == "soft"
    assert found["2.weight"].parametrization.mode == "hard"


def test_soft_assignment_chunks_cover_every_row_in_order() -> None:
    linear, p = clustered_linear(bits=2, temperature=0.1)
    original = linear.parametrizations.weight.original
    chunks = list(p.soft_assignment_chunks(original, chunk_rows=50))
    assert [c.shape for c in chunks] == [(1, 50, 4), (1, 50, 4), (1, 28, 4)]
    full = torch.cat(chunks, dim=1)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 128))
    x = p.layout.to_palettes(original.detach())
    scale = x.std(dim=1, unbiased=False, keepdim=True)
    xt = ((x - x.mean(1, keepdim=True)) / scale).transpose(1, 2)
    cn = (p.centroids - x.mean(1, keepdim=True)) / scale
    torch.testing.assert_close(full, soft_assignment(xt, cn, 0.1).transpose(1, 2))


def test_soft_assignment_chunks_are_the_steps_attention_without_subnormal_entries() -> None:
    # Saturated rows (a small tau): a plain softmax leaves far centroids' entries subnormal
    # (x86's slow path in every op that reads them); the statistics use the step's floor.
    linear, p = clustered_linear(bits=4, temperature=1e-4)
    original = linear.parametrizations.weight.original
    full = torch.cat(list(p.soft_assignment_chunks(original)), dim=1)
    tiny = torch.finfo(full.dtype).tiny
    assert not ((full > 0) & (full < tiny)).any()
    x = p.layout.to_palettes(original.detach())
    scale = x.std(dim=1, unbiased=False, keepdim=True)
    xt = ((x - x.mean(1, keepdim=True)) / scale).transpose(1, 2)
    cn = (p.centroids - x.mean(1, keepdim=True)) / scale
    plain = soft_assignment(xt, cn, 1e-4).transpose(1, 2)
    assert ((plain > 0) & (plain < tiny)).any()  # the case the floor is for
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("bits", "cluster_dim", "group_size", "tau"), [
    (2, 1, None, 0.1), (4, 1, 2, 1e-3), (4, 1, None, 1e-5), (3, 2, 2, 0.05)])
def test_soft_assignment_entropy_is_minus_sum_p_log_p_of_the_chunks(
        bits: int, cluster_dim: int, group_size: int | None, tau: float) -> None:
    # From the logits (log S - sum e z / S) instead of the probabilities; soft, saturated
    # (entries under the floor) and vector palettes, several palettes, several chunks.
    linear, p = clustered_linear(bits=bits, cluster_dim=cluster_dim, group_size=group_size,
                                 temperature=tau)
    original = linear.parametrizations.weight.original
    chunks = list(p.soft_assignment_chunks(original, chunk_rows=24))
    rows = torch.cat(chunks, dim=1).double()
    expected = -torch.special.xlogy(rows, rows).sum()
    total, count = p.soft_assignment_entropy(original, chunk_rows=24)
    assert count == rows.shape[0] * rows.shape[1]
    assert total.dtype == torch.float64 and total.shape == ()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6 * count)


def test_soft_assignment_entropy_of_one_hot_and_of_uniform_rows() -> None:
    # The weights on the centroids and a tiny tau: every row one-hot, 0 nats; a huge tau:
    # every row uniform over the k centroids, log(k) nats each.
    linear, p = clustered_linear(bits=3)
    original = linear.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(p.palette(original).weight())
    p.temperature.fill_(1e-6)
    total, count = p.soft_assignment_entropy(original)
    assert count == 128 and total.item() == 0.0
    p.temperature.fill_(1e12)
    total, _ = p.soft_assignment_entropy(original)
    assert total.item() == pytest.approx(count * math.log(8), rel=1e-6)


@pytest.mark.parametrize("chunk_rows", [0, -3, 2.5, True])
def test_soft_assignments_refuse_a_chunk_size_below_one_row(chunk_rows) -> None:
    linear, p = clustered_linear(bits=2)
    original = linear.parametrizations.weight.original
    with pytest.raises(ValueError, match=rf"chunk_rows must be an int >= 1; got {chunk_rows!r}"):
        p.soft_assignment_entropy(original, chunk_rows=chunk_rows)
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
        next(p.soft_assignment_chunks(original, chunk_rows=chunk_rows))


def test_palette_reproduces_the_eval_weight() -> None:
    linear, p = clustered_linear(bits=3, cluster_dim=2, group_size=2)
    palette = p.palette(linear.parametrizations.weight.original)
    linear.eval()
    assert torch.equal(palette.weight(), linear.weight)
    assert palette.lut.shape == (4, 8, 2) and palette.indices.shape == (4, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_module_stays_finite_down_to_tiny_temperatures(dtype) -> None:
    """``module.to(dtype)`` casts the temperature buffer too; a tau that underflows there
    (1e-8 is 0 in float16) must still give finite weights."""
    linear, p = clustered_linear(bits=2)
    linear.to(dtype).train()
    for tau in (1e-2, 1e-7, 1e-8, 1e-30):
        p.set_temperature(tau)
        weight = linear.weight
        assert weight.dtype == dtype
        assert bool(torch.isfinite(weight.float()).all()), tau
        assert bool(torch.isfinite(p.centroids.float()).all()), tau


# -- implementation="auto" ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "cluster_dim", "bits", "expected"),
    [
        ((512, 1024), 1, 4, "unique"),  # large scalar tensor: the distinct-value step
        ((64, 64), 1, 4, "chunked"),  # small: the exact step (faster than plain autograd)
        ((64, 64), 2, 4, "chunked"),
        ((1024, 1024), 2, 8, "chunked"),  # vectors
    ],
)
def test_auto_picks_the_step_by_tensor_size(shape, cluster_dim, bits, expected):
    from lightning_dkm.engine.parametrization import resolve_implementation

    layout = PaletteLayout(shape, ClusterSpec(bits=bits, cluster_dim=cluster_dim))
    assert resolve_implementation("auto", layout) == expected
    assert resolve_implementation("chunked", layout) == "chunked"  # an explicit choice stands
    assert DKMParametrization(layout).step_implementation == expected


def test_a_scalar_single_palette_weight_clusters_the_same_whatever_the_order_of_its_weights():
    """cluster_dim 1 with one palette does not depend on the weights' order (which is why the
    step may run on a flat view of the weight instead of the layout's permuted copy): the
    weights shuffled give the shuffled output and gradient and the same centroids."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    upstream = torch.randn_like(conv.weight)
    order = torch.randperm(conv.weight.numel())
    layout = PaletteLayout(tuple(conv.weight.shape), ClusterSpec(bits=2))

    def shuffled(t: torch.Tensor) -> torch.Tensor:
        return t.detach().flatten()[order].view_as(t)

    results = []
    for weight, grad_out in ((conv.weight, upstream), (shuffled(conv.weight), shuffled(upstream))):
        p = DKMParametrization(layout, implementation="unique", max_iter=2, epsilon=0.0)
        p.initialize(conv.weight)  # the same centroids to start from
        w = weight.detach().clone().requires_grad_()
        out = p(w)
        (out * grad_out).sum().backward()
        results.append((out.detach(), w.grad, p.centroids.clone()))
    (out, grad, centroids), (out_shuffled, grad_shuffled, centroids_shuffled) = results
    torch.testing.assert_close(out_shuffled, shuffled(out))
    torch.testing.assert_close(centroids_shuffled, centroids)
    # the per-value gradient sums add the same terms in another order (float32 rounding)
    assert float((grad_shuffled - shuffled(grad)).norm() / grad.norm()) < 1e-5


# -- activation checkpointing: a forward run again in the backward ------------------------------


def _checkpointed_step(mode: str, checkpoint: str | None):
    from torch.utils.checkpoint import checkpoint as run_checkpointed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0), mode=mode,
           temperature=3e-2)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = (model(x) if checkpoint is None else
           run_checkpointed(model, x, use_reentrant=checkpoint == "reentrant"))
    out.square().mean().backward()
    centroids = {n: t.parametrization.centroids.clone()
                 for n, t in clustered_tensors(model).items()}
    return {n: p.grad for n, p in model.named_parameters()}, centroids


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("checkpoint", ["non_reentrant", "reentrant"])
def test_a_forward_recomputed_by_activation_checkpointing_moves_the_centroids_once(
    mode, checkpoint
):
    grads, centroids = _checkpointed_step(mode, None)
    checkpointed_grads, checkpointed_centroids = _checkpointed_step(mode, checkpoint)
    for name, value in centroids.items():  # one step's move, not two
        assert torch.equal(checkpointed_centroids[name], value), name
    for name, grad in grads.items():  # the recomputed forward is the first one
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("implementation", [["auto"], {"unique": 1}, 3])
def test_an_implementation_that_is_not_a_name_is_refused_naming_it(implementation):
    from lightning_dkm import DKMCallback

    with pytest.raises(ValueError, match=r"implementation must be 'auto' or one of .*; got "
                                         + re.escape(repr(implementation))):
        DKMCallback(implementation=implementation)
