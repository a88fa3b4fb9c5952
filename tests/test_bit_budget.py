"""Per-tensor widths under a size budget (``average_bits``): the allocation is optimal and never
over budget as the report counts bytes, follows the loss's sensitivity, respects overrides,
min_size and an exporter's widths, and in a fit is logged, checkpointed, resumed and the same on
every rank."""

from __future__ import annotations

import itertools
import json
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import AllocationRecorder, RankDataNet, SquareOnce, TinyNet, trainer
from torch import nn

from lightning_dkm import CompressionReport, DKMCallback, palettize
from lightning_dkm.model.bit_budget import allocate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def brute_force(options, budget):
    """The least summed estimate of any choice within ``budget`` (None: no choice fits)."""
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        size = sum(options[n][b][0] for n, b in zip(names, combo, strict=True))
        estimate = sum(options[n][b][1] for n, b in zip(names, combo, strict=True))
        if size <= budget and (best is None or estimate < best):
            best = estimate
    return best


def random_options(rng, tensors, max_bytes):
    return {f"t{t}": {b: (rng.randint(1, max_bytes), rng.random() * 10)
                      for b in rng.sample(range(1, 9), rng.randint(1, 4))}
            for t in range(tensors)}


def test_allocation_is_optimal_against_brute_force_on_small_budgets():
    rng = random.Random(0)
    for _ in range(300):
        options = random_options(rng, rng.randint(1, 4), 50)
        budget = rng.randint(0, 150)
        best = brute_force(options, budget)
        if best is None:
            with pytest.raises(ValueError, match="below"):
                allocate(options, budget)
            continue
        chosen = allocate(options, budget)
        assert sum(options[n][b][0] for n, b in chosen.items()) <= budget
        assert sum(options[n][b][1] for n, b in chosen.items()) == pytest.approx(best)


def test_allocation_of_large_budgets_stays_within_them_and_near_the_optimum():
    rng = random.Random(1)
    for _ in range(50):
        options = random_options(rng, 3, 10_000_000)
        budget = rng.randint(5_000_000, 20_000_000)
        best = brute_force(options, budget)
        if best is None:
            continue
        chosen = allocate(options, budget)
        assert sum(options[n][b][0] for n, b in chosen.items()) <= budget
        # bytes are counted in units of ceil(budget / 2**16), rounded up: at least as good as
        # the optimum of a budget smaller by one unit per tensor
        unit = -(-budget // 2**16)
        smaller = brute_force(options, budget - 3 * unit)
        if smaller is not None:
            assert sum(options[n][b][1] for n, b in chosen.items()) <= smaller + 1e-9


class TwoLayers(nn.Module):
    """Two 64 x 64 layers with the same weights; the loss weighs the first 100 times more."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)


def two_layer_loss(model, x):
    return 100 * model.a(x).square().mean() + model.b(x).square().mean()


def calibration():
    return [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def uniform_bytes(make, bits, **kwargs):
    model = make()
    return CompressionReport.build(model, palettize(model, bits=bits, **kwargs)).clustered_bytes


def budgeted(make, average_bits, **kwargs):
    model = make()
    palettes = palettize(model, average_bits=average_bits, **kwargs)
    return palettes, CompressionReport.build(model, palettes).clustered_bytes


def test_the_loss_sensitive_tensor_gets_the_wider_width():
    palettes, _ = budgeted(TwoLayers, 3.5, calibration=(calibration(), two_layer_loss),
                           allowed_bits=[2, 3, 4], n_init=1)
    assert palettes["a.weight"].layout.spec.bits > palettes["b.weight"].layout.spec.bits


@pytest.mark.parametrize("calibration_batches", [None, 2])
def test_a_one_shot_calibration_iterator_gives_what_a_list_of_its_batches_gives(
        calibration_batches):
    """A generator is read once: the sensitivities and the allocation's curvature both come
    from its batches, as from a list of them (the allocation does not find it exhausted, or
    start past the batches the sensitivities read)."""
    def run(wrap):
        seen = []

        def loss(model, x):
            seen.append(int(x[0, 0].mul(1e6)))  # which batch: its first entry
            return two_layer_loss(model, x)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to uniform widths
            palettes, _ = budgeted(TwoLayers, 3.5, calibration=(wrap(calibration()), loss),
                                   allowed_bits=[2, 3, 4], n_init=1,
                                   calibration_batches=calibration_batches)
        return palettes, seen

    from_list, list_reads = run(list)
    from_generator, generator_reads = run(lambda batches: (x for x in batches))
    assert generator_reads == list_reads
    assert from_generator.keys() == from_list.keys()
    for name, palette in from_list.items():
        assert from_generator[name].layout.spec.bits == palette.layout.spec.bits
        torch.testing.assert_close(from_generator[name].weight(), palette.weight(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("average_bits", [1, 2, 3])
def test_clustered_bytes_never_exceed_uniform_ones_as_the_report_counts(average_bits):
    _, size = budgeted(TinyNet, average_bits, allowed_bits=[1, 2, 3, 4], n_init=1)
    assert size <= uniform_bytes(TinyNet, average_bits, n_init=1)


def test_a_fractional_budget_lies_between_the_uniform_widths_around_it():
    palettes, size = budgeted(TinyNet, 2.5, allowed_bits=[1, 2, 3, 4], n_init=1)
    low, high = uniform_bytes(TinyNet, 2, n_init=1), uniform_bytes(TinyNet, 3, n_init=1)
    assert low < size <= (low + high) // 2
    assert {p.layout.spec.bits for p in palettes.values()} == {2, 3}


def test_an_override_fixes_its_width_and_counts_against_the_budget():
    overrides = {"body.0": {"bits": 4}}
    palettes, size = budgeted(TinyNet, 2.5, overrides=overrides, allowed_bits=[1, 2, 3],
                              n_init=1)
    assert palettes["body.0.weight"].layout.spec.bits == 4
    assert palettes["body.2.weight"].layout.spec.bits == 1  # what the 4 bits leave
    assert size <= (uniform_bytes(TinyNet, 2, n_init=1) + uniform_bytes(TinyNet, 3, n_init=1)) // 2


def test_a_budget_too_small_for_the_fixed_overrides_is_an_error(monkeypatch):
    import lightning_dkm.model.bit_budget as bit_budget

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran before the bytes said the budget is too small")

    monkeypatch.setattr(bit_budget, "_snap", no_kmeans)  # the bytes alone decide: early
    with pytest.raises(ValueError, match=r"overrides fix take .* Raise average_bits"):
        palettize(TinyNet(), average_bits=1.5, overrides={"body.2": {"bits": 8}})


def test_tensors_below_min_size_are_not_allocated():
    palettes = palettize(TinyNet(), average_bits=2, min_size=3000, allowed_bits=[1, 2, 3],
                         n_init=1)
    assert list(palettes) == ["body.2.weight"]
    assert palettes["body.2.weight"].layout.spec.bits == 2


def test_widths_outside_allowed_bits_are_never_chosen():
    for average_bits in (1.5, 3, 5):
        palettes, _ = budgeted(TinyNet, average_bits, allowed_bits=[1, 2, 4, 6, 8], n_init=1)
        assert {p.layout.spec.bits for p in palettes.values()} <= {1, 2, 4, 6, 8}


@pytest.mark.parametrize("kwargs, match", [
    ({"average_bits": 0.5}, r"average_bits must be .* \[1, 8\]"),
    ({"average_bits": 9}, r"average_bits must be"),
    ({"average_bits": True}, r"average_bits must be"),
    ({"average_bits": float("nan")}, r"average_bits must be"),
    ({"average_bits": 2, "bits": 2}, r"bits=2 and average_bits=2 are both given"),
    ({"allowed_bits": [2, 4], "average_bits": None},
     r"allowed_bits=\[2, 4\] only applies with average_bits"),
    ({"average_bits": "4"}, r"average_bits must be None .*, 'bits' \(a budget of bits\) or"),
    ({"average_bits": 2, "allowed_bits": [0, 2]}, r"allowed_bits must be"),
    ({"average_bits": 2, "allowed_bits": []}, r"allowed_bits must be"),
])
def test_bad_budgets_are_refused_by_the_callback_and_palettize(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DKMCallback(**kwargs)
    with pytest.raises(ValueError, match=match):
        palettize(TinyNet(), **kwargs)


def test_core_ai_export_excludes_the_widths_it_cannot_pack():
    assert DKMCallback(average_bits=3, export_coreai=True).allowed_bits == (1, 2, 4, 6, 8)
    assert DKMCallback(average_bits=3).allowed_bits == tuple(range(1, 9))
    # the default budget of bits=3 chooses among Core AI's widths instead of refusing 3 bits
    by_default = DKMCallback(bits=3, export_coreai=True)
    assert (by_default.average_bits, by_default.allowed_bits) == (3.0, (1, 2, 4, 6, 8))
    with pytest.raises(ValueError, match=r"holds \[3\], which Core AI cannot pack"):
        DKMCallback(average_bits=3, export_coreai=True, allowed_bits=[2, 3, 4])


# -- in a fit -----------------------------------------------------------------------------------
def fit(tmp_path, model, callback, **kwargs):
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=[callback], **kwargs).fit(model)
    return callback


def test_a_fit_clusters_at_the_chosen_widths_and_reports_them(tmp_path):
    torch.manual_seed(0)
    callback = fit(tmp_path, TinyNet(), DKMCallback(average_bits=1.5, save_dir=str(tmp_path),
                                                    verbose=False))
    chosen = callback.bit_allocation.bits
    assert {layer.name: layer.bits for layer in callback.report.layers} == chosen
    assert callback.report.clustered_bytes <= callback.bit_allocation.budget_bytes
    saved = json.loads((tmp_path / "compression_report.json").read_text())["bit_allocation"]
    assert {t["name"]: t["bits"] for t in saved["tensors"]} == chosen
    assert all(t["estimate"] == t["estimates"][str(t["bits"])] for t in saved["tensors"])
    assert saved["sensitivity"].startswith("hessian")
    assert "## Bit allocation (average_bits)" in callback.report.to_markdown()


def test_the_allocation_is_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit(tmp_path, TinyNet(), DKMCallback(average_bits=2, verbose=False), logger=logger,
        max_epochs=1)
    events = EventAccumulator(str(next(Path(logger.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    text = events.Tensors("dkm/bit_allocation/text_summary")[0].tensor_proto.string_val[0]
    assert b"body.0.weight" in text and b"estimate per width" in text


def test_a_resume_keeps_the_checkpoints_widths(tmp_path):
    first = DKMCallback(average_bits=2.5, save_dir=str(tmp_path / "a"), verbose=False,
                        finalize=False)
    fit(tmp_path / "a", TinyNet(), first, max_epochs=1, enable_checkpointing=True)
    checkpoint = next((tmp_path / "a").rglob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    assert saved["bit_allocation"]["tensors"] == first.bit_allocation.to_dict()["tensors"]

    # the same model with its layers' roles swapped: setup alone would choose other widths
    model = TinyNet()
    with torch.no_grad():
        model.body[0].weight.mul_(1e-3)
    resumed = DKMCallback(average_bits=2.5, save_dir=str(tmp_path / "b"), verbose=False)
    torch.manual_seed(0)
    trainer(tmp_path / "b", callbacks=[resumed], max_epochs=2).fit(model, ckpt_path=checkpoint)
    assert resumed.bit_allocation.bits == first.bit_allocation.bits
    assert {n: p.layout.spec.bits for n, p in resumed.palettes.items()} == \
        first.bit_allocation.bits


@pytest.mark.slow
def test_every_ddp_rank_clusters_at_rank_zeros_widths(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, strategy=DDPStrategy(start_method="spawn", broadcast_buffers=False),
                devices=2, max_epochs=1,
                callbacks=[DKMCallback(average_bits=1.5, save_dir=str(tmp_path / "dkm"),
                                       verbose=False),
                           AllocationRecorder(str(tmp_path))])
    t.fit(RankDataNet())  # each rank's training data differs: only a broadcast agrees
    rank0 = json.loads((tmp_path / "allocation_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "allocation_rank1.json").read_text())
    assert rank0 == rank1


@pytest.mark.parametrize("given, bits, budget, allocated", [
    ("average_bits: 2.5\nallowed_bits: [1, 2, 4]", None, 2.5, True),
    ("bits: 2", 2, 2.0, True),  # the default: a budget of bits
    ("bits: 2\naverage_bits: bits", 2, 2.0, True),
    ("bits: 2\naverage_bits: null", 2, None, False),  # every tensor at bits
])
def test_average_bits_comes_from_a_lightning_cli_yaml(tmp_path, given, bits, budget, allocated):
    import yaml
    from lightning.pytorch.cli import LightningCLI

    init_args = {"verbose": False, **yaml.safe_load(given)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning_dkm.DKMCallback",
                                   "init_args": init_args}]},
    }))
    cli = LightningCLI(TinyNet, args=["fit", "--config", str(config)], save_config_callback=None)
    callback = cli.trainer.callbacks[0]
    assert callback.average_bits == budget and callback.spec.bits == (bits or 4)
    assert (callback.bit_allocation is not None) == allocated
    if budget == 2.5:
        assert callback.allowed_bits == (1, 2, 4)
        assert {layer.bits for layer in callback.report.layers} <= {1, 2, 4}
    if allocated:
        assert callback.report.clustered_bytes <= callback.bit_allocation.budget_bytes
    else:
        assert {layer.bits for layer in callback.report.layers} == {bits}


def test_the_estimate_falls_with_width_and_widths_above_4_are_extrapolated():
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model.bit_budget import distortions

    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    estimate = distortions(weight, PaletteLayout((128, 64), ClusterSpec()), range(1, 9))
    assert all(estimate[b] > estimate[b + 1] > 0 for b in range(1, 8))
    for bits in (5, 6, 7, 8):  # each bit beyond 4 quarters the 4-bit k-means error
        assert estimate[bits] == pytest.approx(estimate[4] / 4 ** (bits - 4))


class SelfDistilled(nn.Module):
    """Two 64 x 64 layers with the same weights whose outputs are distilled toward those of the
    unclustered model itself: the loss starts at exactly 0 with zero gradient, and weighs the
    second layer's output 100 times more (the squared error alone ties the twins and gives the
    first the wider width)."""

    def __init__(self) -> None:
        super().__init__()
        twins = TwoLayers()
        self.a, self.b = twins.a, twins.b
        with torch.no_grad():
            self.teacher = [layer(x) for x in calibration() for layer in (self.a, self.b)]


def self_distillation_loss(model, index):
    x = calibration()[index]
    a, b = model.teacher[2 * index], model.teacher[2 * index + 1]
    return (model.a(x) - a).square().mean() + 100 * (model.b(x) - b).square().mean()


def plan(model, sensitivity):
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.model.bit_budget import plan_widths
    from lightning_dkm.model.targets import select_targets

    targets = select_targets(model, ClusterSpec(), targets=["a", "b"], min_size=1)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    return plan_widths(targets, weights, 3.5, sensitivity=sensitivity, allowed_bits=[2, 3, 4])


def test_a_self_distilled_loss_at_its_minimum_still_ranks_tensors_by_their_curvature():
    from lightning_dkm.model.post_training import hessian_diagonal

    model = SelfDistilled()
    assert self_distillation_loss(model, 0) == 0
    hessian = hessian_diagonal(model, range(4), self_distillation_loss, ["a.weight", "b.weight"])
    allocation = plan(model, hessian)
    assert allocation.bits == {"a.weight": 3, "b.weight": 4}
    assert plan(model, None).bits == {"a.weight": 4, "b.weight": 3}
    assert allocation.sensitivity == "given"


def test_squared_gradients_at_the_minimum_are_refused_as_noise_for_uniform_widths():
    from lightning_dkm.model.post_training import fisher_diagonal

    model = SelfDistilled()
    fisher = fisher_diagonal(model, range(4), self_distillation_loss, ["a.weight", "b.weight"])
    with pytest.warns(UserWarning, match=r"average_bits=3.5: the sensitivity \(given\) is "
                      r"rounding noise .*, so every tensor gets the budget's own width"):
        allocation = plan(model, fisher)
    assert allocation.sensitivity == "uniform (given was rounding noise)"
    # 3.5 lies between 3 and 4: neither twin goes below 3 bits to pay for the other
    assert set(allocation.bits.values()) <= {3, 4}
    assert allocation.total_bytes <= allocation.budget_bytes


def test_the_hessian_diagonal_is_exact_where_the_hessian_is_diagonal():
    from lightning_dkm.model.post_training import hessian_diagonal

    model = nn.Linear(8, 4)
    c = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    hessian = hessian_diagonal(model, range(3), lambda m, _: (c * m.weight.square()).sum(),
                               ["weight"])
    torch.testing.assert_close(hessian["weight"], 3 * 2 * c)  # summed over 3 batches


def test_the_hessian_diagonal_leaves_the_model_as_it_was():
    from lightning_dkm.model.post_training import hessian_diagonal

    model = SelfDistilled().train()
    model.b.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hessian_diagonal(model, range(4), self_distillation_loss, ["a.weight", "b.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.a.weight.requires_grad and not model.b.weight.requires_grad


def test_palettize_allocates_by_the_calibration_losss_curvature_as_the_callback_does():
    from lightning_dkm import palettize

    model = SelfDistilled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        palettes = palettize(model, average_bits=3.5, allowed_bits=[2, 3, 4], targets=["a", "b"],
                             min_size=1, calibration=(range(4), self_distillation_loss),
                             progress=False)
    assert {n: p.layout.spec.bits for n, p in palettes.items()} == {"a.weight": 3,
                                                                   "b.weight": 4}
    assert not [w for w in caught if "average_bits" in str(w.message)]


def once_differentiable_loss(m, index):
    x = calibration()[index]
    return SquareOnce.apply(m.a(x) - m.teacher[2 * index]).mean() + SquareOnce.apply(
        m.b(x) - m.teacher[2 * index + 1]).mean()


def test_a_loss_without_second_derivative_is_allocated_by_finite_differences():
    """An op without a double backward (``once_differentiable``): the Hessian-vector products
    become differences of plain gradients, and the widths follow the curvature as they do for
    the same loss with a double backward (``self_distillation_loss``)."""
    from lightning_dkm import palettize

    def widths(loss_fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            palettes = palettize(SelfDistilled(), average_bits=3.5, allowed_bits=[2, 3, 4],
                                 targets=["a", "b"], min_size=1,
                                 calibration=(range(4), loss_fn), progress=False)
        assert not [w for w in caught if "average_bits" in str(w.message)]
        return {n: p.layout.spec.bits for n, p in palettes.items()}

    assert widths(once_differentiable_loss) == widths(self_distillation_loss) == {
        "a.weight": 3, "b.weight": 4}


def test_a_weight_with_fewer_distinct_values_than_centroids_costs_nothing_at_that_width():
    """An already-clustered weight (3 values) estimated and planned at widths of 4+ centroids:
    error 0 there, not a k-means error about too few points."""
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model.bit_budget import distortions

    weight = torch.tensor([-0.5, 0.0, 0.5]).repeat(64 * 64 // 3 + 1)[: 64 * 64].view(64, 64)
    errors = distortions(weight, PaletteLayout((64, 64), ClusterSpec()), range(1, 5))
    assert errors[1] > 0
    assert errors[2] == errors[3] == errors[4] == 0.0
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    palettes = palettize(model, average_bits=3, min_size=0, progress=False)
    assert palettes["0.weight"].weight().unique().numel() == 3


def test_a_gradient_without_graph_is_a_clear_error_not_autograd_internal_one():
    """A loss linear in the weights (or a backward that is not differentiable) leaves nothing
    to differentiate again: a RuntimeError that says so, which average_bits falls back on."""
    from lightning_dkm.model.post_training import hessian_diagonal

    model = nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match=r"no graph to differentiate again: the loss is "
                                           r"linear in them or its backward is not"):
        hessian_diagonal(model, [torch.randn(5, 4)], lambda m, x: m(x).sum(), ["weight"])


@pytest.mark.parametrize("exponent", [66, -66, -100])
def test_the_estimate_of_huge_and_tiny_weights_scales_with_their_square(exponent):
    """Scaling a weight by 2**e scales its estimate by 2**(2e) exactly (same palettes in units
    of their power-of-two unit): the unit's square in float32 overflowed to Inf (NaN estimates)
    around 1e20 and lost its digits (subnormal, or 0) below 1e-20."""
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model.bit_budget import distortions

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator)
    sensitivity = torch.rand(64, 64, generator=generator)
    for spec in (ClusterSpec(), ClusterSpec(cluster_dim=2)):
        layout = PaletteLayout((64, 64), spec)
        widths = range(1, 5) if spec.cluster_dim == 1 else range(1, 3)
        base = distortions(weight, layout, widths, sensitivity)
        scaled = distortions(weight * 2.0 ** exponent, layout, widths, sensitivity)
        for bits in widths:
            expected = base[bits] * 2.0 ** (2 * exponent)
            assert scaled[bits] == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_with_nan_or_inf_is_a_value_error_naming_it(value):
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model.bit_budget import distortions

    weight = torch.randn(64, 64)
    weight[3, 5] = value
    with pytest.raises(ValueError, match=r"layer\.weight: the weight has NaN or Inf"):
        distortions(weight, PaletteLayout((64, 64), ClusterSpec(), name="layer.weight"),
                    range(1, 5))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_sensitivity_with_nan_or_inf_is_a_value_error_not_noise_or_nan_estimates(value):
    """NaN passed _is_noise for rounding noise (uniform widths, a false warning); Inf made the
    estimates NaN, which the knapsack's argmin then chose among at random."""
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.model.bit_budget import plan_widths
    from lightning_dkm.model.targets import select_targets

    model = TinyNet()
    targets = select_targets(model, ClusterSpec(), min_size=0)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    sensitivity = {n: torch.rand_like(w) for n, w in weights.items()}
    name = targets[0].name
    sensitivity[name][0, 0] = value
    with pytest.raises(ValueError, match=f"sensitivity of \\['{name}'\\] has NaN or Inf"):
        plan_widths(targets, weights, 3, sensitivity=sensitivity)


@pytest.mark.parametrize("values", [[0.3], [0.1, 0.2, 0.3, 0.7], [-0.37, 0.011, 0.4242]])
def test_a_weight_of_few_values_off_the_grid_costs_nothing_where_each_has_a_centroid(values):
    """Values that are not multiples of the estimate's 1/512 grid (a weight clustered before,
    a constant): 0 at every width with a centroid per value, as exact k-means has it, not the
    distance to the grid (which the extrapolation above 4 bits then paid bytes to shrink)."""
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model.bit_budget import distortions

    weight = torch.tensor(values).repeat(64 * 64 // len(values) + 1)[: 64 * 64].view(64, 64)
    for spec in (ClusterSpec(), ClusterSpec(group_size=16)):
        errors = distortions(weight, PaletteLayout((64, 64), spec), range(1, 9),
                             torch.rand(64, 64))
        needed = (len(values) - 1).bit_length()
        # 0 up to float64 rounding (the per-cell sums); the grid's distance was 1e-5..1e-3
        assert all(errors[b] < 1e-12 for b in range(max(needed, 1), 9)), errors


@pytest.mark.parametrize("spec", [{}, {"per_channel_scale": True}, {"group_size": 4},
                                  {"cluster_dim": 2}])
def test_the_estimate_is_the_weighted_squared_distance_to_the_snapped_weight(spec, monkeypatch):
    """Summed per grid cell, a few cache-sized pieces at a time: the same sum as the weights'
    own distances to the centroids they snap to (to float32's rounding of the snapped weight
    and of a per-channel scale's division) (#24)."""
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.model import bit_budget

    monkeypatch.setattr(bit_budget, "_PIECE", 1000)  # several pieces, across palettes too
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 96, generator=gen)
    sensitivity = torch.rand(16, 96, generator=gen)
    layout = PaletteLayout((16, 96), ClusterSpec(**spec))
    snapped, = bit_budget._snap([(weight, layout, [1, 2, 3, 4])], seed=0)
    scale = layout.channel_scale(weight)
    # without a sensitivity every weight counts 1 in the units it is clustered in
    unweighted = (torch.ones(16, 96) if scale is None else
                  1 / layout.broadcast_scale(scale).double().square().expand(16, 96))
    for f in (sensitivity, None):
        estimates = bit_budget.distortions(weight, layout, range(1, 5), f)
        for bits in range(1, 5):
            error = (weight.double() - snapped.weight(bits).double()).square()
            exact = 0.5 * float(((unweighted if f is None else f.double()) * error).sum())
            assert estimates[bits] == pytest.approx(exact, rel=1e-6), (bits, f is None)


def test_a_sensitivity_of_finite_values_summing_past_float32_is_not_refused():
    """A finite sensitivity whose float32 sum overflows (the quick finiteness test) is
    checked value by value, not taken for Inf."""
    from lightning_dkm.engine.numerics import all_finite

    big = torch.full((4,), 3e38)
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))


def test_the_hessian_probes_are_the_seeds_rademacher_draws():
    """Each batch's probe is +-1 from an int64 ``randint(0, 2)`` of the seed's generator, one
    per named weight in order, whatever dtype the draws are made in (the allocations of the
    study's runs depend on these draws)."""
    from lightning_dkm.model.post_training import hessian_diagonal

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))

    def loss(m, _):
        return m(x).square().sum()

    names = ["0.weight", "2.weight"]
    got = hessian_diagonal(model, range(2), loss, names, seed=5)
    generator = torch.Generator().manual_seed(5)
    params = [model.get_parameter(n) for n in names]
    expected = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        grads = torch.autograd.grad(loss(model, None), params, create_graph=True)
        zs = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        hz = torch.autograd.grad(grads, params, grad_outputs=zs)
        for e, z, h in zip(expected, zs, hz, strict=True):
            e.add_(z * h)
    for name, e in zip(names, expected, strict=True):
        assert torch.equal(got[name], e.clamp_min(0))


# -- the default: a budget of the widths as configured (#24 item 3) -------------------------------
def test_by_default_the_budget_is_the_bytes_of_every_tensor_at_its_configured_width(tmp_path):
    overrides = {"body.2": {"bits": 4}}
    uniform = fit(tmp_path / "u", TinyNet(), DKMCallback(
        bits=2, overrides=overrides, average_bits=None, save_dir=str(tmp_path / "u"),
        verbose=False), max_epochs=1)
    default = fit(tmp_path / "d", TinyNet(), DKMCallback(
        bits=2, overrides=overrides, save_dir=str(tmp_path / "d"), verbose=False), max_epochs=1)
    assert uniform.bit_allocation is None
    allocation = default.bit_allocation
    assert allocation.average_bits == 2 and allocation.sensitivity.startswith("hessian")
    # the override keeps its 4 bits and its bytes; the budget is what uniform bits=2 stores
    assert allocation.budget_bytes == uniform.report.clustered_bytes
    assert allocation.bits["body.2.weight"] == 4
    assert default.report.clustered_bytes <= uniform.report.clustered_bytes
    # a number instead counts every tensor at it: the fixed 4 bits leave body.0 too little
    with pytest.raises(Exception, match=r"average_bits=2 gives a budget of 1,552 bytes; the 1 "
                                        r"tensor\(s\) whose bits overrides fix take 2,080"):
        fit(tmp_path / "n", TinyNet(), DKMCallback(average_bits=2, overrides=overrides,
                                                   save_dir=str(tmp_path / "n"), verbose=False),
            max_epochs=1)


@pytest.mark.parametrize("written, resumed", [(None, "bits"), ("bits", None)])
def test_a_resume_keeps_the_widths_of_a_checkpoint_written_with_or_without_a_budget(
        tmp_path, written, resumed):
    model = TinyNet()
    with torch.no_grad():
        model.body[2].weight.mul_(1e-3)  # its error barely counts: the budget narrows it
    first = DKMCallback(bits=2, average_bits=written, save_dir=str(tmp_path / "a"),
                        verbose=False, finalize=False)
    fit(tmp_path / "a", model, first, max_epochs=1, enable_checkpointing=True)
    checkpoint = next((tmp_path / "a").rglob("*.ckpt"))
    widths = ({"body.0.weight": 2, "body.2.weight": 2} if first.bit_allocation is None
              else first.bit_allocation.bits)
    if written == "bits":
        assert widths != {"body.0.weight": 2, "body.2.weight": 2}  # the budget did move them
    second = DKMCallback(bits=2, average_bits=resumed, save_dir=str(tmp_path / "b"),
                         verbose=False)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", callbacks=[second], max_epochs=2).fit(TinyNet(),
                                                                      ckpt_path=checkpoint)
    assert {n: p.layout.spec.bits for n, p in second.palettes.items()} == widths
    assert (second.bit_allocation is None) == (written is None)
    if written is None:
        assert any("trained without an allocation" in str(w.message) for w in seen)


def test_the_allocation_at_setup_leaves_the_fits_random_state_as_it_was(tmp_path):
    """The sensitivity batch iterates a shuffled dataloader (a draw from torch's generator):
    a seeded fit sees the same data order with or without the default budget."""
    import numpy as np

    class RandomState(Callback):
        def __init__(self):
            self.seen = []

        def setup(self, trainer, pl_module, stage):
            self.seen.append((torch.get_rng_state(), random.getstate(), np.random.get_state()[1]))

    before, after = RandomState(), RandomState()
    callback = DKMCallback(bits=2, save_dir=str(tmp_path), verbose=False)
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=[before, callback, after], max_epochs=1).fit(TinyNet())
    assert callback.bit_allocation.sensitivity.startswith("hessian")
    (torch_before, python_before, numpy_before), = before.seen
    (torch_after, python_after, numpy_after), = after.seen
    assert torch.equal(torch_before, torch_after) and python_before == python_after
    assert (numpy_before == numpy_after).all()


# -- a resume under other allocation settings ----------------------------------------------
@pytest.fixture(scope="module")
def allocated_checkpoint(tmp_path_factory):
    """A mid-DKM checkpoint of bits=2 under the default budget, body.2 fixed at 4 bits."""
    tmp_path = tmp_path_factory.mktemp("allocated")
    first = DKMCallback(bits=2, overrides={"body.2": {"bits": 4}}, save_dir=str(tmp_path),
                        verbose=False, finalize=False)
    fit(tmp_path, TinyNet(), first, max_epochs=1, enable_checkpointing=True)
    return next(tmp_path.rglob("*.ckpt")), first.bit_allocation.bits


def resume_warnings(tmp_path, checkpoint, **changed):
    settings = {"overrides": {"body.2": {"bits": 4}}, **changed}
    resumed = DKMCallback(bits=2, save_dir=str(tmp_path), verbose=False, **settings)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[resumed], max_epochs=2).fit(TinyNet(), ckpt_path=checkpoint)
    return resumed, [str(w.message) for w in seen if "allocation was made" in str(w.message)]


@pytest.mark.parametrize("changed, says", [
    ({"overrides": {"body.2": {"bits": 3}}},
     r"overrides: checkpoint \{'body\.2': \{'bits': 4\}\}, now \{'body\.2': \{'bits': 3\}\}"),
    ({"average_bits": None}, r"average_bits: checkpoint 2, now None"),
    ({"allowed_bits": [2, 4]}, r"allowed_bits: checkpoint \[1, 2, 3, 4, 5, 6, 7, 8\], now "
                               r"\[2, 4\]"),
    ({"lut_dtype": "float32"}, r"lut_dtype: checkpoint 'float16', now 'float32'"),
], ids=["overrides", "average_bits", "allowed_bits", "lut_dtype"])
def test_a_resume_under_other_allocation_settings_warns_once_and_keeps_the_checkpoints_widths(
        tmp_path, allocated_checkpoint, changed, says):
    # Before: the checkpoint's widths were kept without a word, whatever the settings now.
    checkpoint, widths = allocated_checkpoint
    resumed, warned = resume_warnings(tmp_path, checkpoint, **changed)
    assert len(warned) == 1
    assert re.search(says, warned[0]) and "checkpoint's allocation is kept" in warned[0]
    assert {n: p.layout.spec.bits for n, p in resumed.palettes.items()} == widths


def test_a_resume_under_the_same_allocation_settings_does_not_warn(tmp_path,
                                                                   allocated_checkpoint):
    checkpoint, widths = allocated_checkpoint
    resumed, warned = resume_warnings(tmp_path, checkpoint)
    assert warned == []
    assert {n: p.layout.spec.bits for n, p in resumed.palettes.items()} == widths


def test_an_allocation_saved_without_its_overrides_still_loads():
    """A checkpoint or report written before allocations recorded their overrides."""
    from lightning_dkm.model.bit_budget import BitAllocation

    saved = {"average_bits": 2.0, "budget_bytes": 10, "total_bytes": 8, "allowed_bits": [1, 2],
             "lut_dtype": "float16", "sensitivity": "none",
             "tensors": [{"name": "w", "bits": 2, "bytes": 8, "fixed": False, "estimate": 0.5,
                          "estimates": {"2": 0.5}}]}
    allocation = BitAllocation.from_dict(saved)
    assert allocation.bits == {"w": 2} and allocation.overrides is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_widths_gives_the_same_allocation_with_and_without_the_native_loops(dtype):
    """The grid's passes over the weights as C loops or as PyTorch ops: the same widths and
    estimates to the last bit, on whole-tensor, grouped and scaled palettes; and the given
    sensitivity is read, not written (a float64 one was scaled in place before, #24)."""
    from lightning_dkm.engine import native
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.model.bit_budget import plan_widths
    from lightning_dkm.model.targets import select_targets

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 40))
    with torch.no_grad():
        model[0].weight.mul_(torch.randn(200, 300, generator=gen).exp())  # heavy tails
        model[1].weight[:, :50] = 0.0
    for spec in (ClusterSpec(), ClusterSpec(group_size=8), ClusterSpec(per_channel_scale=True)):
        targets = select_targets(model, spec, min_size=1)
        weights = {t.name: model.get_parameter(t.name) for t in targets}
        sensitivity = {n: torch.rand(w.shape, generator=gen, dtype=dtype) ** 3
                       for n, w in weights.items()}
        kept = {n: s.clone() for n, s in sensitivity.items()}
        fast = plan_widths(targets, weights, 2.5, sensitivity=sensitivity)
        with native.turned_off():
            by_ops = plan_widths(targets, weights, 2.5, sensitivity=sensitivity)
        assert fast.to_dict() == by_ops.to_dict()
        assert all(torch.equal(sensitivity[n], kept[n]) for n in kept)
