"""A temperature given by the assignment entropy it produces: the calibration hits its target
at every bit width, vector length and palette count, and does not depend on the weights' scale."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dkm.engine.kmeans import kmeans
from lightning_dkm.lightning.temperature import (
    DEFAULT_END_ENTROPY,
    DEFAULT_START_ENTROPY,
    TemperatureConfig,
    TemperaturePlan,
    mean_assignment_entropy,
    temperature_for_entropy,
)


def palettes(gen, P: int, n: int, d: int, bits: int, laplace: bool = False):
    x = torch.randn(P, n, d, generator=gen) * 0.03
    if laplace:
        x = torch.distributions.Laplace(0.0, 0.02).sample((P, n, d))
    centroids = kmeans(x, 2**bits, torch.Generator().manual_seed(0), max_iter=50).centroids
    return x, centroids


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("P", "d"), [(1, 1), (1, 2), (4, 1)])
def test_the_calibrated_tau_gives_the_target_entropy(gen, bits, P, d):
    x, centroids = palettes(gen, P, 4096, d, bits)
    target = 0.2 * bits
    tau = temperature_for_entropy(x, centroids, target)
    assert mean_assignment_entropy(x, centroids, tau) == pytest.approx(target, rel=1e-4)


def test_the_subsample_represents_the_whole_tensor(gen):
    x, centroids = palettes(gen, 1, 200_000, 1, 2, laplace=True)
    tau = temperature_for_entropy(x, centroids, 0.2)
    whole = mean_assignment_entropy(x, centroids, tau, max_points=10**7)
    assert whole == pytest.approx(0.2, rel=0.03)


def test_one_target_entropy_needs_a_smaller_tau_for_more_centroids(gen):
    x = torch.randn(1, 8192, 1, generator=gen)
    taus = []
    for bits in (1, 2, 3, 4):
        centroids = kmeans(x, 2**bits, torch.Generator().manual_seed(0), max_iter=50).centroids
        taus.append(temperature_for_entropy(x, centroids, 0.05))
    assert taus == sorted(taus, reverse=True)
    assert taus[0] / taus[-1] > 10  # the same tau would mean very different softness


def test_the_calibration_does_not_depend_on_the_weights_scale(gen):
    x, centroids = palettes(gen, 1, 4096, 1, 3)
    tau = temperature_for_entropy(x, centroids, 0.5)
    assert temperature_for_entropy(x * 1e3, centroids * 1e3, 0.5) == pytest.approx(tau, rel=1e-5)


def test_a_larger_target_gives_a_larger_tau(gen):
    x, centroids = palettes(gen, 1, 4096, 1, 2)
    assert temperature_for_entropy(x, centroids, 0.01) < temperature_for_entropy(x, centroids, 0.5)


def _unfloored_bisection(x, centroids, entropy_bits):
    """The search as it was before the log floor: the same bracket and halvings on the plain
    softmax entropy (every assignment's exp taken as it is, underflows included)."""
    from lightning_dkm.lightning import temperature

    distances = temperature._distances(x, centroids, temperature.DEFAULT_MAX_POINTS)

    def entropy(tau):
        log_a = torch.log_softmax(distances / -tau, dim=1)
        return float(-(log_a.exp() * log_a).sum(1).mean() / math.log(2.0))

    low, high = math.log(temperature._TAU_LOW), math.log(temperature._TAU_HIGH)
    for _ in range(temperature._BISECTIONS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if entropy(math.exp(middle)) < entropy_bits else (low, middle)
    return math.exp(0.5 * (low + high))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("laplace", [False, True])
def test_the_log_floor_leaves_the_calibrated_tau_bit_for_bit_as_it_was(gen, bits, laplace):
    # heavy tails put most assignments far below e^-87 at the end's small tau
    x, centroids = palettes(gen, 1, 20_000, 1, bits, laplace=laplace)
    top = math.log2(2**bits)
    start, end = TemperatureConfig.parse("auto").bounds(x, centroids)
    assert start == _unfloored_bisection(x, centroids, DEFAULT_START_ENTROPY * top)
    assert end == _unfloored_bisection(x, centroids, min(DEFAULT_END_ENTROPY, 0.5 * top))


def test_the_start_and_the_end_share_their_distances_and_common_evaluations(gen, monkeypatch):
    from lightning_dkm.lightning import temperature

    x, centroids = palettes(gen, 1, 4096, 1, 3)
    calls = {"distances": 0, "entropy": 0}
    distances, entropy_bits = temperature._distances, temperature._entropy_bits

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(temperature, "_distances", counted("distances", distances))
    monkeypatch.setattr(temperature, "_entropy_bits", counted("entropy", entropy_bits))
    TemperatureConfig.parse("auto").bounds(x, centroids)
    assert calls["distances"] == 1
    # two searches of two bracket ends and 30 halvings each, the bracket's ends and the
    # first midpoint (where both targets lie below it) evaluated once
    assert calls["entropy"] <= 2 * (2 + temperature._BISECTIONS) - 3


@pytest.mark.parametrize("target", [0.0, -0.1, 2.0, 3.0, math.nan])
def test_a_target_outside_zero_to_log2_k_is_refused_naming_it(gen, target):
    x, centroids = palettes(gen, 1, 1024, 1, 2)
    with pytest.raises(ValueError, match=r"fc\.weight: .*\(0, log2 k = 2\)"):
        temperature_for_entropy(x, centroids, target, name="fc.weight")


def test_equal_centroids_give_the_end_of_the_bracket_instead_of_looping(gen):
    x = torch.full((1, 1024, 1), 0.5)
    centroids = torch.full((1, 4, 1), 0.5)
    tau = temperature_for_entropy(x, centroids, 0.5)
    assert math.isfinite(tau) and tau > 0


@pytest.mark.parametrize(("bits", "d"), [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_auto_bounds_give_the_start_and_end_entropies(gen, bits, d):
    x, centroids = palettes(gen, 1, 4096, d, bits)
    start, end = TemperatureConfig().bounds(x, centroids)
    assert mean_assignment_entropy(x, centroids, start) == pytest.approx(
        DEFAULT_START_ENTROPY * bits, rel=1e-4
    )
    assert mean_assignment_entropy(x, centroids, end) == pytest.approx(
        DEFAULT_END_ENTROPY, rel=1e-3
    )


def test_numeric_bounds_are_the_numbers_for_every_tensor(gen):
    x, centroids = palettes(gen, 1, 1024, 1, 2)
    numbers = TemperatureConfig.parse({"start": 0.1, "end": 0.001})
    assert numbers.bounds(x, centroids) == (0.1, 0.001)
    assert TemperatureConfig.parse(0.05).bounds(x, centroids) == (0.05, 0.05)


def test_a_plan_interpolates_each_tensors_bounds_over_its_units(gen):
    plan = TemperaturePlan(TemperatureConfig.parse({"start": 1.0, "end": 0.01}))
    plan.calibrate({"a": palettes(gen, 1, 256, 1, 1)})
    plan.set_units(3)
    assert [plan.taus(u)["a"] for u in range(4)] == pytest.approx([1.0, 0.1, 0.01, 0.01])


def test_a_plan_round_trips_its_bounds_through_state_dict(gen):
    plan = TemperaturePlan(TemperatureConfig())
    plan.calibrate({"a": palettes(gen, 1, 1024, 1, 2), "b": palettes(gen, 2, 512, 1, 3)})
    other = TemperaturePlan(TemperatureConfig())
    other.load_state_dict(plan.state_dict())
    assert other.bounds == plan.bounds
    plan.set_units(10)
    other.set_units(10)
    assert other.taus(7) == plan.taus(7)


class _UnhashableSchedule:
    """A callable schedule that defines ``__eq__`` and so has no hash (as a plain dataclass)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UnhashableSchedule)

    def __call__(self, unit: int) -> float:
        return 0.1 / (1 + unit)


@pytest.mark.parametrize("given", [_UnhashableSchedule(), {"schedule": _UnhashableSchedule(),
                                                           "interval": "epoch"}])
def test_an_unhashable_callable_schedule_is_taken_as_any_callable(given):
    from lightning_dkm.lightning.temperature import TemperatureConfig

    config = TemperatureConfig.parse(given)
    assert isinstance(config.schedule, _UnhashableSchedule)
    assert not config.anneals


def test_an_end_entropy_above_half_of_log2_k_is_capped_with_one_warning_naming_the_tensors(gen):
    narrow = palettes(gen, 1, 2048, 1, 1)  # k = 2: at most 0.5 bits at the end
    wide = palettes(gen, 1, 2048, 1, 4)  # k = 16: 0.8 bits is below 2
    config = TemperatureConfig.parse({"end_entropy": 0.8})
    plan = TemperaturePlan(config)
    with pytest.warns(UserWarning, match=r"end_entropy=0\.8 bits is above half of log2 k for 1 "
                                         r"tensor\(s\).*: fc1\.weight \(k=2: 0\.5 bits\)") as seen:
        plan.calibrate({"fc1.weight": narrow, "fc2.weight": wide})
    assert len([w for w in seen if "end_entropy" in str(w.message)]) == 1
    assert "fc2.weight" not in str(seen[0].message)
    x, centroids = narrow
    assert mean_assignment_entropy(x, centroids, plan.bounds["fc1.weight"][1]) == pytest.approx(
        0.5, rel=1e-4)


def test_the_default_end_entropy_calibrates_without_a_warning(gen):
    import warnings

    plan = TemperaturePlan(TemperatureConfig.parse("auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.calibrate({"fc.weight": palettes(gen, 1, 2048, 1, 1)})
