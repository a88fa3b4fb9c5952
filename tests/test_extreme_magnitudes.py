"""Specification: clustering does not depend on the weights' magnitude (#23, item 5).

A weight ``W`` and ``c * W`` give centroids ``c * C`` and the same indices, through k-means++
seeding, every DKM step (``"unique"``, ``"chunked"``, ``"reference"``; soft and hard modes), the
``auto`` temperature calibration, finalize and ``palettize``, for ``c`` from 1e-20 to 1e20
(before: weights below ~1e-15 collapsed to one or two values, 1e19 gave "weight contains NaN",
1e20 "invalid multinomial distribution"). For a power of two ``c`` the results are ``c`` times
the unit ones bit for bit; for other ``c`` within float rounding (``c * W`` is itself rounded;
the ``"unique"`` step rounds each weight once more, to float16, so a few weights in ten thousand
may take the neighbouring code and the other centroid). k-means++ is continuous in the data only
almost everywhere: one ulp can move a draw to the neighbouring point (about ``n * 1e-7`` per
draw), and the seeding then differs altogether; the decimal scales here use data where no draw
moves, and the power-of-two tests show that the rounding of ``c * W`` is the only difference.
A weight that is truly NaN or Inf is still refused, with its name.

The training steps feed the soft weights a fixed gradient ``R`` and step with SGD at
``lr = 1e-3 * c``: the gradient of a soft weight w.r.t. its original is scale-free, so every
update is ``c`` times the unit one, and ``|gradient| * |weight|`` stays within float32's range.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from lightning_dkm import (
    ClusterSpec,
    attach,
    clustered_tensors,
    finalize,
    palettize,
    select_targets,
)
from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.engine.numerics import normalization_of, sync_free
from lightning_dkm.lightning.temperature import TemperatureConfig, TemperaturePlan

SCALES = [1e-20, 1e-8, 1e8, 1e20]
POWERS_OF_TWO = [2.0**-66, 2.0**66]  # about 1.4e-20 and 7.4e19
IMPLEMENTATIONS = ["unique", "chunked", "reference"]
SPECS = {
    "scalar": ClusterSpec(bits=2),
    "grouped": ClusterSpec(bits=3, group_size=32),
    "vectors": ClusterSpec(bits=4, cluster_dim=2),
    "per-channel": ClusterSpec(bits=2, per_channel_scale=True),
}
STEPS = 3


class Clustered(NamedTuple):
    """What a fit leaves per tensor: the LUT (in the weight's units, or in channel-scaled units
    times the per-channel scales with ``per_channel_scale``), indices and auto tau bounds."""

    luts: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor | None]
    indices: dict[str, torch.Tensor]
    taus: dict[str, tuple[float, float]]


def model(c: float) -> nn.Module:
    """Two layers (8,192 and 2,048 weights), their weights multiplied by ``c``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(c)
    return net


@functools.cache
def fit(c: float, implementation: str = "auto", spec: str = "scalar", mode: str = "soft",
        host_reads: bool = True) -> Clustered:
    """attach -> auto tau (calibrated as DKMCallback does) -> a few training steps -> finalize."""
    net = model(c)
    tensors = attach(net, select_targets(net, SPECS[spec], min_size=1), mode=mode,
                     implementation=implementation)
    plan = TemperaturePlan(TemperatureConfig())
    plan.calibrate({name: (t.parametrization.to_palettes(t.original.detach()),
                           t.parametrization.centroids) for name, t in tensors.items()})
    plan.set_units(STEPS)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3 * c)
    g = torch.Generator().manual_seed(1)
    gradients = [torch.randn(p.shape, generator=g) for p in net.parameters()]
    net.train()
    for step in range(STEPS):
        for name, tau in plan.taus(step).items():
            tensors[name].parametrization.set_temperature(tau)
        optimizer.zero_grad()
        with sync_free() if not host_reads else torch.enable_grad():
            torch.autograd.backward([net[0].weight, net[1].weight], gradients)
        optimizer.step()
    palettes = finalize(net)
    return Clustered({n: p.lut.float() for n, p in palettes.items()},
                     {n: None if p.scale is None else p.scale.float() for n, p in palettes.items()},
                     {n: p.indices for n, p in palettes.items()}, dict(plan.bounds))


def assert_scaled(scaled: Clustered, unit: Clustered, c: float, *, exact: bool = False,
                  rtol: float = 1e-5, index_mismatches: float = 0.0,
                  tau_rtol: float | None = None) -> None:
    """``scaled`` is ``unit`` times ``c``: LUTs (relative to each one's largest entry; with
    per-channel scales, the scales times ``c`` and the scale-free LUTs equal) within ``rtol``
    and taus within ``tau_rtol`` (default ``rtol``), at most a fraction ``index_mismatches``
    of indices differing; bit for bit with ``exact``."""
    tau_rtol = rtol if tau_rtol is None else tau_rtol
    assert scaled.luts.keys() == unit.luts.keys()
    for name in unit.luts:
        channel_scaled = unit.scales[name] is not None
        pairs = [(scaled.luts[name], unit.luts[name], 1.0 if channel_scaled else c)]
        if channel_scaled:
            pairs.append((scaled.scales[name], unit.scales[name], c))
        for mine, theirs, factor in pairs:
            if exact:
                assert torch.equal(mine, theirs * factor), name
            else:
                peak = float(theirs.abs().max())
                torch.testing.assert_close(mine / factor, theirs, rtol=rtol, atol=rtol * peak,
                                           msg=name)
        differ = (scaled.indices[name] != unit.indices[name]).float().mean().item()
        assert differ <= (0.0 if exact else index_mismatches), (name, differ)
        for a, b in zip(scaled.taus[name], unit.taus[name], strict=True):
            assert a == (b if exact else pytest.approx(b, rel=tau_rtol)), name


# -- DKM: seeding, auto tau, soft steps, finalize ---------------------------------------------
@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dkm_clusters_scaled_weights_as_it_clusters_unit_ones(implementation, c):
    unique = implementation == "unique"
    assert_scaled(fit(c, implementation), fit(1.0, implementation), c,
                  rtol=5e-4 if unique else 1e-5, index_mismatches=1e-3 if unique else 0.0)


@pytest.mark.parametrize("c", POWERS_OF_TWO)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dkm_of_weights_scaled_by_a_power_of_two_is_scaled_bit_for_bit(implementation, c):
    assert_scaled(fit(c, implementation), fit(1.0, implementation), c, exact=True)


@pytest.mark.parametrize("c", [1e-20, 1e20])
@pytest.mark.parametrize("spec", list(SPECS))
def test_grouped_vector_and_per_channel_palettes_cluster_scaled_weights_alike(spec, c):
    """(``"auto"``: ``"unique"`` for the larger tensor's scalar palettes.) A per-channel scale is
    rounded to float16 where float16 holds it (so that a float16 artifact stores it exactly),
    which the scales of 1e+-20 weights are not: their channel-scaled weights differ from the
    unit ones by that rounding (2**-11), their optimal centroids by up to 1e-3 and the taus
    calibrated from them by up to 1e-2 (0.5 % measured: the rounding differs per channel, so
    the palettes are not a scaled copy of the unit ones)."""
    channel_scaled = SPECS[spec].per_channel_scale
    rtol = 1e-3 if channel_scaled else 2e-4
    assert_scaled(fit(c, spec=spec), fit(1.0, spec=spec), c, rtol=rtol, index_mismatches=1e-3,
                  tau_rtol=1e-2 if channel_scaled else None)


@pytest.mark.parametrize("c", [1e-20, 1e20])
def test_hard_mode_clusters_scaled_weights_as_it_clusters_unit_ones(c):
    assert_scaled(fit(c, mode="hard"), fit(1.0, mode="hard"), c)


@pytest.mark.parametrize("c", [1e-20, 1e20])
@pytest.mark.parametrize("implementation", ["unique", "chunked"])
def test_without_host_reads_scaled_weights_cluster_as_unit_ones(implementation, c):
    """The accelerator form of the steps (no value read back) at both extremes."""
    unique = implementation == "unique"
    assert_scaled(fit(c, implementation, host_reads=False),
                  fit(1.0, implementation, host_reads=False), c,
                  rtol=5e-4 if unique else 1e-5, index_mismatches=1e-3 if unique else 0.0)


# -- the pieces where the scale entered ---------------------------------------------------------
@pytest.mark.parametrize("c", [1e-20, 1e20])
def test_kmeans_plusplus_seeds_scaled_weights_as_it_seeds_unit_ones(c, gen):
    """The k-means++ probabilities are squared distances: 1e40 overflowed float32 (torch's
    "invalid multinomial distribution"), 1e-40 underflowed it."""
    x = torch.randn(2, 5000, 2, generator=gen)
    unit = kmeans(x, 8, torch.Generator().manual_seed(0))
    scaled = kmeans(x * c, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled.centroids / c, unit.centroids, rtol=1e-5, atol=1e-5)
    assert torch.equal(scaled.labels, unit.labels)


@pytest.mark.parametrize("c", [1e-20, 1e20])
def test_the_normalisation_of_scaled_weights_is_scaled(c, gen):
    """The standard deviation is a sum of squares: inf at 1e20 (NaN soft weights), and an
    absolute 1e-12 floor made every palette below it one blob."""
    x = torch.randn(3, 4000, 1, generator=gen) * 0.02 + 0.01
    unit, scaled = normalization_of(x), normalization_of(x * c)
    torch.testing.assert_close(scaled.scale / c, unit.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled.center / c, unit.center, rtol=1e-6, atol=0)


def test_a_constant_palette_gets_a_positive_scale_relative_to_its_value():
    """The floor of a palette without spread is float rounding of its value (was an absolute
    1e-12, far larger than the whole palette of tiny weights); zeros get a fixed one."""
    assert float(normalization_of(torch.zeros(1, 100, 1)).scale) > 0
    tiny_constant = normalization_of(torch.full((1, 100, 1), 1e-30))
    assert 0 < float(tiny_constant.scale) < 1e-36  # float32 rounding of 1e-30: 1.2e-37


@pytest.mark.parametrize("c", SCALES)
def test_palettize_clusters_scaled_weights_as_it_clusters_unit_ones(c):
    unit, scaled = model(1.0), model(c)
    expected = palettize(unit, bits=3, min_size=1)
    got = palettize(scaled, bits=3, min_size=1)
    for name, palette in expected.items():
        torch.testing.assert_close(got[name].lut / c, palette.lut, rtol=1e-5, atol=0)
        assert torch.equal(got[name].indices, palette.indices)


# -- what is still refused ----------------------------------------------------------------------
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_attach_refuses_a_non_finite_weight_naming_it(value):
    net = model(1.0)
    with torch.no_grad():
        net[1].weight[3, 5] = value
    with pytest.raises(ValueError, match=r"1\.weight: weight contains NaN or Inf"):
        attach(net, select_targets(net, ClusterSpec(bits=2), min_size=1))


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_finalize_refuses_a_weight_that_became_non_finite_naming_it(value):
    net = model(1e20)
    attach(net, select_targets(net, ClusterSpec(bits=2), min_size=1))
    with torch.no_grad():
        clustered_tensors(net)["0.weight"].original[0, 0] = value
    with pytest.raises(ValueError, match=r"0\.weight: weight contains NaN or Inf"):
        finalize(net)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_palettize_refuses_a_non_finite_weight_naming_it(value):
    net = model(1e-20)
    with torch.no_grad():
        net[0].weight[1, 2] = value
    with pytest.raises(ValueError, match=r"0\.weight: weight contains NaN or Inf"):
        palettize(net, bits=2, min_size=1)


def test_a_palette_below_float16s_normal_range_is_saved_in_float32_with_a_warning(tmp_path):
    """At 1e-20 every centroid would be 0 in a float16 LUT: the artifact keeps that LUT in
    float32, says so, and loads back bit for bit."""
    from lightning_dkm import load_compressed, palettize, save_compressed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(1e-20)
    palettize(model, bits=2)
    path = tmp_path / "tiny.dkm.safetensors"
    with pytest.warns(UserWarning, match=r"'0\.weight': every centroid lies below float16's "
                                         r"normal range.*stored in float32"):
        save_compressed(model, path)  # lut_dtype float16, the default
    fresh = nn.Sequential(nn.Linear(64, 64))
    load_compressed(fresh, path)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert len(torch.unique(fresh[0].weight)) == 4
