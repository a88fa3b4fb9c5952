"""Specification of the palette format and the two ways to reach it: ``attach`` + training +
``finalize`` (DKM), and ``palettize`` (post-training k-means)."""

from __future__ import annotations

import copy
import importlib
import io
import math
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

import lightning_dkm.engine.kmeans as kmeans_module
from lightning_dkm import (
    ClusterSpec,
    Palette,
    PaletteLayout,
    attach,
    clustered_tensors,
    finalize,
    palettize,
    select_targets,
)
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.model.post_training import fisher_diagonal


def distinct_rows_per_palette(x: torch.Tensor) -> list[int]:
    """Number of distinct d-vectors in each palette of ``x`` (P, n, d)."""
    return [int(torch.unique(x[p], dim=0).shape[0]) for p in range(x.shape[0])]


def assert_palettized(model: nn.Module, palettes: dict[str, Palette]) -> None:
    """Every palette rebuilds its weight bit for bit, with at most 2**bits vectors per palette."""
    assert palettes
    for name, palette in palettes.items():
        weight = model.get_parameter(name)
        assert torch.equal(palette.weight(), weight), name
        k = palette.layout.spec.num_centroids
        counts = distinct_rows_per_palette(palette.layout.to_palettes(weight.detach()))
        assert max(counts) <= k, (name, counts)
        assert counts == palette.distinct_values_per_palette(), name


# (module factory, input factory, spec): one clustered layer per case, called as model(*inputs).
class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.layer(*inputs)
        return out[0] if isinstance(out, tuple) else out


def _tokens() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 40, (3, 5)),)


def _sequence() -> tuple[torch.Tensor, ...]:
    x = torch.randn(5, 2, 16)
    return (x, x, x)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], ClusterSpec]] = {
    "linear": (lambda: nn.Linear(32, 16), lambda: (torch.randn(4, 32),), ClusterSpec(bits=3)),
    "linear-grouped": (
        lambda: nn.Linear(32, 16),
        lambda: (torch.randn(4, 32),),
        ClusterSpec(bits=2, group_size=4),
    ),
    "conv2d-dim1": (
        lambda: nn.Conv2d(8, 16, 3),
        lambda: (torch.randn(2, 8, 6, 6),),
        ClusterSpec(bits=3, cluster_dim=1),
    ),
    "conv2d-dim2": (
        lambda: nn.Conv2d(8, 16, 3),
        lambda: (torch.randn(2, 8, 6, 6),),
        ClusterSpec(bits=3, cluster_dim=2),
    ),
    "conv2d-dim4-grouped": (
        lambda: nn.Conv2d(8, 16, 3),
        lambda: (torch.randn(2, 8, 6, 6),),
        ClusterSpec(bits=3, cluster_dim=4, group_size=8),
    ),
    "embedding": (lambda: nn.Embedding(40, 16), _tokens, ClusterSpec(bits=4, cluster_dim=2)),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(8, 6, 3),
        lambda: (torch.randn(2, 8, 4, 4),),
        ClusterSpec(bits=2, cluster_dim=2, group_size=3),
    ),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3), lambda: (torch.randn(2, 4, 9),), ClusterSpec(bits=2)),
    "conv3d": (
        lambda: nn.Conv3d(4, 8, 2),
        lambda: (torch.randn(1, 4, 3, 3, 3),),
        ClusterSpec(bits=2, cluster_dim=2),
    ),
    "multihead_attention": (lambda: nn.MultiheadAttention(16, 2), _sequence, ClusterSpec(bits=3)),
}


def train_clustered(case: str, steps: int = 2) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """Build the case's model, attach DKM, take a few SGD steps; return it and its Parameters."""
    make_layer, make_inputs, spec = CASES[case]
    model = Holder(make_layer())
    targets = select_targets(model, spec, min_size=0)
    parameters = {t.name: model.get_parameter(t.name) for t in targets}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    attach(model, targets, temperature=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(*make_inputs()).square().mean().backward()
        optimizer.step()
    return model, parameters


# -- finalize ------------------------------------------------------------------------------------
class Finalized(NamedTuple):
    case: str
    model: nn.Module
    parameters: dict[str, nn.Parameter]  # the clustered Parameters, taken before attach
    palettes: dict[str, Palette]


@pytest.fixture(scope="module", params=list(CASES))
def finalized(request: pytest.FixtureRequest) -> Finalized:
    """Each case trained with DKM for two steps and finalized (shared by the tests below)."""
    torch.manual_seed(0)
    model, parameters = train_clustered(request.param)
    return Finalized(request.param, model, parameters, finalize(model))


def test_finalize_leaves_at_most_2_to_the_bits_values_per_palette(finalized: Finalized) -> None:
    assert list(finalized.palettes) == list(finalized.parameters)
    assert_palettized(finalized.model, finalized.palettes)


def test_finalize_returns_a_plain_model_of_its_own_class(finalized: Finalized) -> None:
    layer = finalized.model.layer
    assert type(layer) is type(CASES[finalized.case][0]())
    assert not hasattr(layer, "parametrizations")
    assert clustered_tensors(finalized.model) == {}


def test_finalize_keeps_the_original_parameter_objects(finalized: Finalized) -> None:
    for name, parameter in finalized.parameters.items():
        assert finalized.model.get_parameter(name) is parameter
        assert isinstance(parameter, nn.Parameter) and parameter.requires_grad


def test_the_finalized_model_computes_what_the_clustered_model_computed_in_eval() -> None:
    model, _ = train_clustered("conv2d-dim2")
    x = torch.randn(2, 8, 6, 6)
    model.eval()
    with torch.no_grad():
        before = model(x)
    finalize(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_finalize_with_names_finalizes_only_those_tensors() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))
    palettes = finalize(model, names=["1.weight"])
    assert list(palettes) == ["1.weight"]
    assert list(clustered_tensors(model)) == ["0.weight"]
    assert type(model[1]) is nn.Linear


def test_tied_weights_are_finalized_once_and_stay_tied() -> None:
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 32, bias=False))
    model[1].weight = model[0].weight
    targets = select_targets(model, ClusterSpec(bits=2), min_size=0)
    assert [(t.name, t.tied) for t in targets] == [("0.weight", (("1", "weight"),))]
    attach(model, targets)
    palettes = finalize(model)
    assert list(palettes) == ["0.weight"]
    assert model[1].weight is model[0].weight
    assert torch.unique(model[1].weight).numel() <= 4


def test_a_constant_weight_is_clustered_and_finalized_without_nan() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    with pytest.warns(UserWarning, match="fewer distinct values than k=4"):
        attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0))
    centroids = clustered_tensors(model)["0.weight"].parametrization.centroids
    assert bool(torch.isfinite(centroids).all())
    assert torch.unique(centroids, dim=1).shape[1] == 4
    model.train()
    model(torch.randn(2, 16)).sum().backward()
    palettes = finalize(model)
    assert bool((model[0].weight == 0.5).all())
    assert_palettized(model, palettes)


# -- palettize -----------------------------------------------------------------------------------
def test_palettize_snaps_the_selected_weights_in_place() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    parameters = [model[0].weight, model[3].weight]
    original = [p.detach().clone() for p in parameters]
    palettes = palettize(model, bits=3, cluster_dim=2, min_size=0)
    assert list(palettes) == ["0.weight", "3.weight"]
    assert all(a is b for a, b in zip((model[0].weight, model[3].weight), parameters, strict=True))
    assert_palettized(model, palettes)
    for parameter, before in zip(parameters, original, strict=True):
        error = (parameter.detach() - before).square().mean()
        assert 0 < error < before.square().mean()  # snapped, and much closer than zero


@pytest.mark.parametrize("case", ["linear-grouped", "conv_transpose2d", "multihead_attention"])
def test_palettize_uses_the_same_targets_and_format_as_finalize(case: str) -> None:
    make_layer, _, spec = CASES[case]
    model = Holder(make_layer())
    dkm_model = copy.deepcopy(model)
    ptq = palettize(model, spec.bits, spec.cluster_dim, spec.group_size, min_size=0, n_init=1)
    attach(dkm_model, select_targets(dkm_model, spec, min_size=0))
    dkm = finalize(dkm_model)
    assert ptq.keys() == dkm.keys()
    for name in ptq:
        assert ptq[name].layout == dkm[name].layout
        assert ptq[name].lut.shape == dkm[name].lut.shape
        assert ptq[name].lut.dtype == dkm[name].lut.dtype
        assert ptq[name].indices.shape == dkm[name].indices.shape
        assert ptq[name].indices.dtype == dkm[name].indices.dtype
    assert_palettized(model, ptq)


def test_palettize_honours_targets_exclude_overrides_and_min_size() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    with pytest.warns(UserWarning, match=r"min_size=256 .*2\.weight \(128 elements\)"):
        palettes = palettize(
            model, bits=4, exclude="1", overrides={"0": {"bits": 2}}, min_size=256, n_init=1
        )
    assert list(palettes) == ["0.weight"]
    assert palettes["0.weight"].layout.spec.bits == 2
    assert torch.unique(model[0].weight).numel() <= 4
    assert torch.unique(model[1].weight).numel() > 16  # excluded: untouched


def test_palettize_of_vectors_with_the_same_seed_is_reproducible() -> None:
    model = nn.Sequential(nn.Linear(32, 16))
    a, b, c = (copy.deepcopy(model) for _ in range(3))
    palettize(a, bits=3, cluster_dim=2, min_size=0, seed=1, n_init=1)
    palettize(b, bits=3, cluster_dim=2, min_size=0, seed=1, n_init=1)
    palettize(c, bits=3, cluster_dim=2, min_size=0, seed=2, n_init=1)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_palettize_of_scalars_is_the_optimum_whatever_the_seed() -> None:
    model = nn.Sequential(nn.Linear(32, 16))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    palettize(a, bits=3, min_size=0, seed=1)
    palettize(b, bits=3, min_size=0, seed=2)
    assert torch.equal(a[0].weight, b[0].weight)


class Mixed(nn.Module):
    """Tensors of several sizes and kinds: tied, constant, with fewer distinct values than a
    4-bit palette, and two of one shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 48)
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(96, 48)
        self.c = nn.Linear(48, 48)
        self.constant = nn.Linear(48, 64)
        self.few = nn.Linear(64, 48)
        self.head = nn.Linear(48, 300, bias=False)
        self.head.weight = self.embed.weight  # tied
        with torch.no_grad():
            self.constant.weight.fill_(0.125)
            self.few.weight.copy_(torch.randint(-2, 3, self.few.weight.shape) * 0.1)


@pytest.mark.parametrize("spec", [
    dict(bits=4), dict(bits=2, per_channel_scale=True), dict(bits=3, group_size=4),
    dict(bits=6), dict(bits=2, cluster_dim=2),
])
def test_palettize_of_a_model_equals_palettize_of_each_tensor_alone(spec: dict) -> None:
    """The tensors of a model share one batched program: each gets bit for bit the palette it
    gets when it is the only tensor clustered."""
    with pytest.warns(UserWarning):  # the constant and the few-valued tensors
        together = palettize(Mixed(), progress=False, min_size=1, **spec)
    assert "head.weight" not in together  # tied: one palette, the embedding's
    for name, palette in together.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = palettize(Mixed(), targets=[name], progress=False, min_size=1, **spec)
        assert torch.equal(palette.lut, alone[name].lut), name
        assert torch.equal(palette.indices, alone[name].indices), name


def test_palettize_in_waves_of_few_weights_gives_the_same_palettes(monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_once = palettize(Mixed(), bits=4, progress=False, min_size=1)
        monkeypatch.setattr(kmeans_module, "WAVE_WEIGHTS", 1000)  # a tensor a wave
        one_by_one = palettize(Mixed(), bits=4, progress=False, min_size=1)
    assert at_once.keys() == one_by_one.keys()
    for name, palette in at_once.items():
        assert torch.equal(palette.lut, one_by_one[name].lut), name
        assert torch.equal(palette.indices, one_by_one[name].indices), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0}, r"bits must be an int in 1\.\.8; got 0"),
        ({"bits": 9}, r"bits must be an int in 1\.\.8; got 9"),
        ({"cluster_dim": 3}, r"0\.weight: cluster_dim=3 does not divide .*size 16"),
        ({"group_size": 3}, r"0\.weight: group_size=3 does not divide .*size 8"),
        ({"bits": 8}, r"0\.weight: each palette holds 128 vectors, fewer than 2\*\*bits = 256"),
    ],
)
def test_palettize_rejects_a_spec_that_does_not_fit_naming_parameter_and_value(
    kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        palettize(nn.Sequential(nn.Linear(16, 8)), min_size=0, **kwargs)


def test_palettize_rejects_nan_weights_naming_the_parameter() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"0\.weight: weight contains NaN or Inf .*only finite"):
        palettize(model, bits=2, min_size=0)


def test_palettize_rejects_non_floating_weights_naming_the_parameter() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    model[0].weight = nn.Parameter(torch.ones(8, 16, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match=r"0\.weight: only floating-point .* got torch\.int64"):
        palettize(model, bits=2, min_size=0)


def test_palettize_keeps_the_weight_dtype() -> None:
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    palettes = palettize(model, bits=2, min_size=0, n_init=1)
    assert model[0].weight.dtype == torch.bfloat16
    assert palettes["0.weight"].lut.dtype == torch.bfloat16
    assert_palettized(model, palettes)


# -- sensitivity-weighted palettize (SqueezeLLM) -------------------------------------------------
def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def regression_batches(
    n_in: int = 16, n_out: int = 4, count: int = 3, size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(size, n_in), torch.randn(size, n_out)) for _ in range(count)]


def reference_fisher(
    model: nn.Module, batches: list, names: list[str]
) -> dict[str, torch.Tensor]:
    """Sum over batches of the squared ``.grad`` from ``loss.backward()``, in eval mode."""
    model = copy.deepcopy(model).eval()
    total = {name: torch.zeros_like(model.get_parameter(name)) for name in names}
    for batch in batches:
        model.zero_grad()
        mse_loss(model, batch).backward()
        for name in names:
            total[name] += model.get_parameter(name).grad.square()
    return total


class CountingLoader:
    """An iterable of batches that counts how many were taken."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.taken = 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def test_fisher_diagonal_is_the_sum_over_batches_of_squared_gradients() -> None:
    model, batches = mlp(), regression_batches()
    names = ["0.weight", "2.weight", "2.bias"]
    fisher = fisher_diagonal(model, batches, mse_loss, names)
    expected = reference_fisher(model, batches, names)
    assert list(fisher) == names
    for name in names:
        assert fisher[name].dtype == torch.float32
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=0)


def test_fisher_diagonal_takes_the_gradients_without_dropout() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    batches = regression_batches()
    fisher = fisher_diagonal(model, batches, mse_loss, ["0.weight"])
    torch.testing.assert_close(
        fisher["0.weight"], reference_fisher(model, batches, ["0.weight"])["0.weight"]
    )


def test_fisher_diagonal_restores_the_training_flag_of_every_module() -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    model[1].eval()
    fisher_diagonal(model, regression_batches(), mse_loss, ["0.weight"])
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_fisher_diagonal_leaves_weights_grads_and_requires_grad_as_they_were() -> None:
    model = mlp()
    model[2].bias.requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher_diagonal(model, regression_batches(), mse_loss, ["0.weight", "2.weight"])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
        assert param.requires_grad == flags[name], name
    assert bool((model[0].weight.grad == 7.0).all())
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["0.weight"]


def test_fisher_diagonal_measures_a_frozen_weight() -> None:
    model, batches = mlp(), regression_batches()
    expected = reference_fisher(model, batches, ["0.weight"])["0.weight"]
    model.requires_grad_(False)
    fisher = fisher_diagonal(model, batches, mse_loss, ["0.weight"])
    torch.testing.assert_close(fisher["0.weight"], expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_fisher_diagonal_works_under_no_grad() -> None:
    model, batches = mlp(), regression_batches()
    with torch.no_grad():
        fisher = fisher_diagonal(model, batches, mse_loss, ["0.weight"])
    expected = fisher_diagonal(model, batches, mse_loss, ["0.weight"])
    assert torch.equal(fisher["0.weight"], expected["0.weight"])


def test_fisher_diagonal_reads_at_most_num_batches() -> None:
    model, batches = mlp(), regression_batches(count=5)
    loader = CountingLoader(batches)
    fisher = fisher_diagonal(model, loader, mse_loss, ["0.weight"], num_batches=2)
    assert loader.taken == 2
    expected = reference_fisher(model, batches[:2], ["0.weight"])["0.weight"]
    torch.testing.assert_close(fisher["0.weight"], expected)


def test_fisher_diagonal_is_zero_for_a_weight_the_loss_does_not_reach() -> None:
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(16, 4))
    names = ["0.weight", "1.weight"]
    fisher = fisher_diagonal(model, regression_batches(), mse_loss_of_first, names)
    assert bool((fisher["0.weight"] > 0).any())
    assert torch.equal(fisher["1.weight"], torch.zeros(4, 16))


def mse_loss_of_first(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model[0](x), y)


def test_fisher_diagonal_passes_the_batch_as_the_loader_yields_it() -> None:
    class Batch(NamedTuple):
        inputs: dict[str, torch.Tensor]
        target: torch.Tensor

    seen: list = []

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        seen.append(batch)
        return nn.functional.mse_loss(model(batch.inputs["x"]), batch.target)

    batch = Batch({"x": torch.randn(8, 16)}, torch.randn(8, 4))
    fisher_diagonal(mlp(), [batch], loss_fn, ["0.weight"])
    assert type(seen[0]) is Batch and list(seen[0].inputs) == ["x"]
    assert torch.equal(seen[0].inputs["x"], batch.inputs["x"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fisher_diagonal_moves_the_batch_to_the_weights_device() -> None:
    model, batches = mlp(), regression_batches()
    fisher = fisher_diagonal(model.cuda(), batches, mse_loss, ["0.weight"])
    assert fisher["0.weight"].device.type == "cuda"
    expected = reference_fisher(model.cpu(), batches, ["0.weight"])["0.weight"]
    torch.testing.assert_close(fisher["0.weight"].cpu(), expected, rtol=1e-4, atol=1e-7)


def _nan_loss(model: nn.Module, batch) -> torch.Tensor:
    return mse_loss(model, batch) * float("nan")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["0.wieght"]}, r"names: '0\.wieght' is not a parameter .*0\.weight, 0\.bias"),
        ({"num_batches": 0}, r"num_batches must be None \(all batches\) or an int >= 1; got 0"),
        ({"num_batches": True}, r"num_batches must be None .*; got True"),
        ({"dataloader": []}, "dataloader yielded no batches"),
        ({"dataloader": 3}, "dataloader must be an iterable of batches; got int"),
        ({"loss_fn": "mse"}, r"loss_fn must be a callable loss_fn\(model, batch\) .*got str"),
        (
            {"loss_fn": lambda m, b: m(b[0])},
            r"loss_fn must return a scalar loss tensor; got shape \(8, 4\) on batch 0",
        ),
        (
            {"loss_fn": lambda m, b: mse_loss(m, b).item()},
            "loss_fn must return a scalar loss tensor; got float on batch 0",
        ),
        (
            {"loss_fn": lambda m, b: mse_loss(m, b).detach()},
            "loss_fn's loss on batch 0 does not depend on any of the weights measured",
        ),
        ({"loss_fn": _nan_loss}, r"0\.weight: the Fisher information .* is NaN or Inf"),
    ],
)
def test_fisher_diagonal_rejects_bad_arguments_naming_them(kwargs: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(16, 4))
    args = {
        "dataloader": regression_batches(),
        "loss_fn": mse_loss,
        "names": ["0.weight"],
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(model, **args)


SPECS_FOR_FISHER = [
    ClusterSpec(bits=2),
    ClusterSpec(bits=3, group_size=4),
    ClusterSpec(bits=3, cluster_dim=2),
]


@pytest.mark.parametrize("spec", SPECS_FOR_FISHER, ids=str)
def test_palettize_with_uniform_fisher_equals_plain_palettize(spec: ClusterSpec) -> None:
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    plain, weighted = copy.deepcopy(model), copy.deepcopy(model)

    def uniform(model: nn.Module, batch) -> torch.Tensor:  # every gradient is 1
        return model[0].weight.sum() + model[1].weight.sum()

    kwargs = {"bits": spec.bits, "cluster_dim": spec.cluster_dim, "group_size": spec.group_size}
    expected = palettize(plain, min_size=0, n_init=2, **kwargs)
    palettes = palettize(weighted, min_size=0, n_init=2, calibration=([None], uniform), **kwargs)
    for name, palette in palettes.items():
        assert torch.equal(palette.lut, expected[name].lut), name
        assert torch.equal(palette.indices, expected[name].indices), name
    assert_palettized(weighted, palettes)


def test_palettize_weights_kmeans_by_the_fisher_of_the_unsnapped_model(monkeypatch) -> None:
    """The Fisher weights are internal to ``palettize``: k-means, as ``model/post_training.py``
    calls it, is wrapped to record the weights it receives."""
    # the module (``lightning_dkm.model.post_training`` the attribute is the function)
    module = importlib.import_module("lightning_dkm.model.post_training")
    model = mlp()
    batches = regression_batches()
    fisher = fisher_diagonal(model, batches, mse_loss, ["0.weight", "2.weight"])
    received: list[torch.Tensor] = []

    def recording_kmeans(*args, sample_weight=None, **kwargs):
        received.append(sample_weight)
        return kmeans(*args, sample_weight=sample_weight, **kwargs)

    monkeypatch.setattr(module, "kmeans", recording_kmeans)
    palettes = palettize(
        model, bits=2, cluster_dim=2, group_size=2, min_size=0, calibration=(batches, mse_loss)
    )
    assert list(palettes) == ["0.weight", "2.weight"]
    for (name, palette), weight in zip(palettes.items(), received, strict=True):
        vectors = palette.layout.to_palettes(fisher[name]).sum(-1)  # (P, n): F summed per vector
        expected = vectors / vectors.amax(dim=1, keepdim=True)
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-7)


def anti_correlated_regression(
    seed: int,
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """A least-squares-fitted Linear(32 -> 16) whose 8 loud inputs (scale 10) carry small weights
    and whose 24 quiet inputs (scale 1) carry large ones: plain k-means spends its 4 levels on
    the large weights, but the loss is 100 times more sensitive to the small ones."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((8,), 10.0), torch.ones(24)])
    teacher = torch.randn(16, 32, generator=g) / scale

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 32, generator=g) * scale
        return x, x @ teacher.T + 0.1 * torch.randn(n, 16, generator=g)

    x, y = draw(512)
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]
    return model, batches, draw(4096)


def test_sensitivity_weighted_palettize_loses_less_than_plain_at_2_bits() -> None:
    model, batches, held_out = anti_correlated_regression(seed=0)
    plain, weighted = copy.deepcopy(model), copy.deepcopy(model)
    palettize(plain, bits=2, min_size=0)
    palettize(weighted, bits=2, min_size=0, calibration=(batches, mse_loss))
    with torch.no_grad():
        trained, plain_loss, weighted_loss = (
            mse_loss(m, held_out) for m in (model, plain, weighted)
        )
    assert trained < 0.02  # the fit is at the noise floor (0.1 ** 2)
    # measured: plain 25.3, weighted 7.4 (seeds 0-4 of this setup: ratios 0.29-0.54)
    assert weighted_loss < 0.7 * plain_loss


def test_palettize_still_fits_centroids_to_weights_without_gradient() -> None:
    model = nn.Sequential(nn.Linear(16, 8, bias=False))

    def two_weights(model: nn.Module, batch) -> torch.Tensor:  # only w[0, 0] and w[0, 1] matter
        return model[0].weight[0, :2].square().sum()

    sensitive = model[0].weight[0, :2].detach().clone()
    palettes = palettize(model, bits=2, min_size=0, calibration=([None], two_weights))
    torch.testing.assert_close(model[0].weight[0, :2], sensitive)  # they keep their values
    # the other two centroids serve the 126 insensitive weights: 4 values in use, none idle
    assert palettes["0.weight"].distinct_values_per_palette() == [4]


def test_palettize_warns_and_clusters_unweighted_a_tensor_without_gradient() -> None:
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(16, 4))
    plain = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"1\.weight: the calibration loss has zero gradient for "
                      r"every weight of 1 of 1 palette\(s\)"):
        palettes = palettize(
            model, bits=2, min_size=0, calibration=(regression_batches(), mse_loss_of_first)
        )
    expected = palettize(plain, bits=2, min_size=0)
    assert torch.equal(palettes["1.weight"].lut, expected["1.weight"].lut)
    assert torch.equal(model[1].weight, plain[1].weight)


def test_palettize_reads_at_most_calibration_batches() -> None:
    loader = CountingLoader(regression_batches(count=5))
    palettize(mlp(), bits=2, min_size=0, calibration=(loader, mse_loss), calibration_batches=3)
    assert loader.taken == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration": mse_loss}, r"calibration must be None or a pair \(dataloader, loss_fn\); "
         "got function"),
        ({"calibration": ([],)}, r"calibration must be .*; got tuple of length 1"),
        ({"calibration": (5, mse_loss)}, r"calibration\[0\] \(the dataloader\) must be an "
         "iterable of batches; got int"),
        ({"calibration": ([], "mse")}, r"calibration\[1\] \(loss_fn\) must be a callable "
         r"loss_fn\(model, batch\) -> scalar loss tensor; got str"),
        ({"calibration": ([], mse_loss), "calibration_batches": 0},
         r"calibration_batches must be None \(all batches\) or an int >= 1; got 0"),
        ({"calibration_batches": 4}, r"calibration_batches=4 is given without calibration"),
    ],
)
def test_palettize_rejects_malformed_calibration_naming_it(kwargs: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(16, 4))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        palettize(model, bits=2, min_size=0, **kwargs)
    assert torch.equal(model[0].weight, before)


# -- the Palette itself --------------------------------------------------------------------------
def test_palette_weight_is_the_lut_gathered_by_the_indices() -> None:
    layout = PaletteLayout((4, 4), ClusterSpec(bits=1, cluster_dim=2, group_size=2))
    lut = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    indices = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    palette = Palette(lut, indices, layout)
    expected = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 1.0, 2.0], [7.0, 8.0, 7.0, 8.0], [5.0, 6.0, 5.0, 6.0]]
    )
    assert torch.equal(palette.weight(), expected)
    assert palette.distinct_values_per_palette() == [2, 2]


@pytest.mark.parametrize(
    ("lut_shape", "indices", "message"),
    [
        ((1, 3, 1), torch.zeros(1, 16, dtype=torch.long), r"w: LUT shape \(1, 3, 1\)"),
        ((1, 4, 1), torch.zeros(1, 15, dtype=torch.long), r"w: indices shape \(1, 15\)"),
        ((1, 4, 1), torch.zeros(1, 16), "w: indices must be integers"),
        ((1, 4, 1), torch.full((1, 16), 4, dtype=torch.long), r"w: indices must lie in \[0, 4\)"),
    ],
)
def test_a_malformed_palette_is_rejected(lut_shape, indices, message: str) -> None:
    layout = PaletteLayout((4, 4), ClusterSpec(bits=2), name="w")
    with pytest.raises(ValueError, match=message):
        Palette(torch.zeros(lut_shape), indices, layout)


def test_palette_sizes_count_the_lut_and_the_bit_packed_indices() -> None:
    layout = PaletteLayout((6, 10), ClusterSpec(bits=3, group_size=3))
    palette = Palette(torch.zeros(2, 8, 1), torch.zeros(2, 30, dtype=torch.long), layout)
    assert palette.num_indices == 60
    assert palette.index_bytes() == math.ceil(60 * 3 / 8)
    assert palette.lut_bytes() == 16 * 4 and palette.lut_bytes(torch.float16) == 16 * 2
    assert palette.compressed_bytes() == palette.lut_bytes() + palette.index_bytes()


# -- progress ----------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))


def test_palettize_shows_a_progress_bar_on_a_terminal(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    palettize(_two_layers(), bits=2, min_size=0)
    shown = terminal.getvalue()
    assert "palettize" in shown and "2/2" in shown and "tensor" in shown


@pytest.mark.parametrize("progress", [None, False])
def test_palettize_shows_no_progress_bar_off_a_terminal_or_when_told(progress, capsys) -> None:
    palettize(_two_layers(), bits=2, min_size=0, progress=progress)  # pytest's stderr: no TTY
    assert capsys.readouterr().err == ""


def test_palettize_shows_the_progress_bar_when_told_even_off_a_terminal(capsys) -> None:
    palettize(_two_layers(), bits=2, min_size=0, progress=True)
    assert "2/2" in capsys.readouterr().err
