"""Specification of the DKM convergence metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics import Metric

from lightning_dkm.diagnostics import count_host_syncs
from lightning_dkm.lightning.metrics import AssignmentEntropy, ClusterUsage, SnapDistance


def _compute_as_two_ranks(local: Metric, other: Metric) -> object:
    """``local.compute()`` after syncing with ``other`` as if it were a second process.

    The fake all-gather returns both ranks' copy of each state, so the metric's declared
    ``dist_reduce_fx`` does the reduction, exactly as under DDP. ``local`` must be built with
    ``sync_on_compute=False`` so that ``compute`` does not try to sync a second time.
    """
    peers = {id(getattr(local, name)): getattr(other, name) for name in local._defaults}

    def gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return [tensor, peers[id(tensor)]]

    with local.sync_context(dist_sync_fn=gather, distributed_available=lambda: True):
        return local.compute()


def _items(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in result.items()}


# --- AssignmentEntropy ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 16, 256])
def test_entropy_of_uniform_rows_is_log2_k(k: int) -> None:
    metric = AssignmentEntropy()
    metric.update(torch.full((10, k), 1.0 / k))
    assert metric.compute().item() == pytest.approx(math.log2(k))


def test_entropy_of_one_hot_rows_is_zero() -> None:
    metric = AssignmentEntropy()
    metric.update(torch.eye(8))
    assert metric.compute().item() == 0.0


def test_entropy_is_in_bits() -> None:
    metric = AssignmentEntropy()
    metric.update(torch.tensor([[0.5, 0.25, 0.25]]))
    assert metric.compute().item() == pytest.approx(1.5)


def test_entropy_is_the_mean_over_all_rows_seen() -> None:
    metric = AssignmentEntropy()
    metric.update(torch.tensor([[0.5, 0.5]]))  # 1 bit
    metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # 0 bits each
    assert metric.compute().item() == pytest.approx(1 / 3)


def test_entropy_flattens_leading_dimensions_into_rows() -> None:
    probs = torch.softmax(torch.randn(3, 5, 4), dim=-1)
    nested, flat = AssignmentEntropy(), AssignmentEntropy()
    nested.update(probs)
    flat.update(probs.reshape(15, 4))
    assert nested.compute().item() == pytest.approx(flat.compute().item(), rel=1e-12)


def test_chunked_entropy_equals_unchunked_entropy() -> None:
    probs = torch.softmax(torch.randn(70_000, 4, generator=torch.Generator().manual_seed(0)), -1)
    chunked, whole = AssignmentEntropy(chunk_rows=2**12), AssignmentEntropy(chunk_rows=70_000)
    chunked.update(probs)
    whole.update(probs)
    expected = -(probs.double() * probs.double().log2()).sum(-1).mean().item()
    assert chunked.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)
    assert chunked.compute().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_is_what_xlogy_gives_also_on_rows_with_exact_zeros(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5_000, 16, generator=g, dtype=dtype) * 40, -1)
    probs[::7, 3] = 0.0  # exact zeros next to underflowed ones
    metric = AssignmentEntropy()
    metric.update(probs)
    expected = -torch.special.xlogy(probs, probs).sum(dtype=torch.float64) / math.log(2) / 5_000
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6)


def test_entropy_accepts_half_precision_inputs() -> None:
    metric = AssignmentEntropy()
    metric.update(torch.full((4, 8), 1.0 / 8, dtype=torch.bfloat16))
    assert metric.compute().item() == pytest.approx(3.0)


def test_entropy_accepts_non_contiguous_rows() -> None:
    metric = AssignmentEntropy(chunk_rows=3)
    metric.update(torch.full((4, 10), 0.25).t())  # (10, 4) view with strides (1, 10)
    assert metric.compute().item() == pytest.approx(2.0)


def test_entropy_does_not_track_gradients() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    metric = AssignmentEntropy()
    metric.update(torch.softmax(logits, -1))
    assert not metric.entropy_sum.requires_grad


def test_entropy_states_reduce_by_sum_across_processes() -> None:
    a, b = AssignmentEntropy(sync_on_compute=False), AssignmentEntropy()
    both = AssignmentEntropy()
    x, y = torch.softmax(torch.randn(7, 4), -1), torch.eye(4)[:3]
    a.update(x)
    b.update(y)
    both.update(torch.cat([x, y]))
    synced = _compute_as_two_ranks(a, b)
    assert synced.item() == pytest.approx(both.compute().item(), rel=1e-12)


def test_entropy_merge_state_equals_one_metric_on_all_data() -> None:
    a, b, both = AssignmentEntropy(), AssignmentEntropy(), AssignmentEntropy()
    x, y = torch.softmax(torch.randn(7, 4), -1), torch.softmax(torch.randn(2, 4), -1)
    a.update(x)
    b.update(y)
    both.update(torch.cat([x, y]))
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(both.compute().item(), rel=1e-12)


@pytest.mark.parametrize("bad", [torch.tensor(0.5), torch.ones(3, 0)])
def test_entropy_rejects_inputs_without_a_cluster_dimension(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"probs must have shape \(\.\.\., k\) with k >= 1"):
        AssignmentEntropy().update(bad)


def test_entropy_rejects_integer_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"probs must be a floating-point tensor, got torch\.int64"
    ):
        AssignmentEntropy().update(torch.ones(2, 2, dtype=torch.int64))


def test_entropy_rejects_chunk_rows_below_one() -> None:
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1, got 0"):
        AssignmentEntropy(chunk_rows=0)


# --- ClusterUsage -----------------------------------------------------------------------------


def test_usage_of_a_uniform_histogram_has_perplexity_k_and_no_dead_clusters() -> None:
    metric = ClusterUsage(num_clusters=8)
    metric.update(torch.arange(8).repeat(5))
    result = metric.compute()
    assert result["usage_entropy"].item() == pytest.approx(3.0)
    assert result["perplexity"].item() == pytest.approx(8.0)
    assert result["dead_clusters"].item() == 0.0
    assert result["dead_fraction"].item() == 0.0


def test_usage_of_a_single_cluster_has_perplexity_one() -> None:
    metric = ClusterUsage(num_clusters=8)
    metric.update(torch.full((100,), 3))
    result = metric.compute()
    assert result["usage_entropy"].item() == 0.0
    assert result["perplexity"].item() == 1.0
    assert result["dead_clusters"].item() == 7.0
    assert result["dead_fraction"].item() == pytest.approx(7 / 8)


def test_usage_counts_dead_clusters_as_a_float_tensor() -> None:
    metric = ClusterUsage(num_clusters=6)
    metric.update(torch.tensor([[0, 1], [1, 4]]))  # any shape; clusters 2, 3, 5 unused
    dead = metric.compute()["dead_clusters"]
    assert dead.is_floating_point()
    assert dead.item() == 3.0


def test_usage_accumulates_across_updates() -> None:
    metric = ClusterUsage(num_clusters=2)
    metric.update(torch.tensor([0, 0, 0]))
    metric.update(torch.tensor([1]))
    assert metric.counts.tolist() == [[3, 1]]
    assert metric.compute()["dead_clusters"].item() == 0.0


def test_usage_with_palettes_keeps_one_histogram_per_palette() -> None:
    metric = ClusterUsage(num_clusters=4, num_palettes=2)
    # Palette 0 uses all 4 clusters evenly; palette 1 uses only cluster 0.
    metric.update(torch.stack([torch.arange(4).repeat(2), torch.zeros(8, dtype=torch.long)]))
    result = metric.compute()
    assert metric.counts.tolist() == [[2, 2, 2, 2], [8, 0, 0, 0]]
    assert result["dead_clusters"].item() == 3.0
    assert result["dead_fraction"].item() == pytest.approx(3 / 8)
    assert result["usage_entropy"].item() == pytest.approx((2.0 + 0.0) / 2)
    assert result["perplexity"].item() == pytest.approx((4.0 + 1.0) / 2)


def test_usage_with_palettes_requires_the_palette_dimension_first() -> None:
    with pytest.raises(ValueError, match=r"shape \(num_palettes=2, \.\.\.\).*got \(3, 4\)"):
        ClusterUsage(num_clusters=4, num_palettes=2).update(torch.zeros(3, 4, dtype=torch.long))


def test_usage_states_reduce_by_sum_across_processes() -> None:
    a, b = ClusterUsage(num_clusters=4, sync_on_compute=False), ClusterUsage(num_clusters=4)
    both = ClusterUsage(num_clusters=4)
    a.update(torch.tensor([0, 1]))
    b.update(torch.tensor([1, 2]))
    both.update(torch.tensor([0, 1, 1, 2]))
    synced = _compute_as_two_ranks(a, b)
    assert synced["dead_clusters"].item() == 1.0
    assert _items(synced) == pytest.approx(_items(both.compute()))


def test_usage_merge_state_equals_one_metric_on_all_data() -> None:
    a, b, both = ClusterUsage(5), ClusterUsage(5), ClusterUsage(5)
    x, y = torch.tensor([0, 0, 1]), torch.tensor([4, 4])
    a.update(x)
    b.update(y)
    both.update(torch.cat([x, y]))
    a.merge_state(b)
    assert torch.equal(a.counts, both.counts)
    assert _items(a.compute()) == pytest.approx(_items(both.compute()))


@pytest.mark.parametrize(("indices", "bad"), [([0, 4], 4), ([-1, 2], -1)])
def test_usage_rejects_out_of_range_indices_naming_the_value(indices: list[int], bad: int) -> None:
    with pytest.raises(ValueError, match=rf"\[0, num_clusters=4\), got a value of {bad}"):
        ClusterUsage(num_clusters=4).update(torch.tensor(indices))


def test_usage_skips_the_range_check_when_validate_args_is_false() -> None:
    metric = ClusterUsage(num_clusters=4, validate_args=False)
    metric.update(torch.tensor([0, 3]))
    assert metric.counts.sum().item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_usage_rejects_non_integer_indices(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        ClusterUsage(num_clusters=4).update(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("arg", ["num_clusters", "num_palettes"])
def test_usage_rejects_sizes_below_one(arg: str) -> None:
    kwargs = {"num_clusters": 4, "num_palettes": 1, arg: 0}
    with pytest.raises(ValueError, match=rf"{arg} must be an int >= 1, got 0"):
        ClusterUsage(**kwargs)


# --- SnapDistance -----------------------------------------------------------------------------


def test_snap_distance_reports_rmse_and_mean_abs() -> None:
    metric = SnapDistance()
    metric.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 3.0, 7.0]))
    result = metric.compute()
    assert result["rmse"].item() == pytest.approx(math.sqrt((0 + 1 + 0 + 9) / 4))
    assert result["mean_abs"].item() == pytest.approx((0 + 1 + 0 + 3) / 4)


def test_snap_distance_is_zero_for_snapped_weights() -> None:
    w = torch.randn(3, 5)
    metric = SnapDistance()
    metric.update(w, w.clone())
    assert _items(metric.compute()) == {"rmse": 0.0, "mean_abs": 0.0}


def test_snap_distance_chunked_equals_unchunked() -> None:
    w, s = torch.randn(1000, 7), torch.randn(1000, 7)
    chunked, whole = SnapDistance(chunk_size=97), SnapDistance(chunk_size=10**6)
    chunked.update(w, s)
    whole.update(w, s)
    assert _items(chunked.compute()) == pytest.approx(_items(whole.compute()), rel=1e-12)


def test_snap_distance_merge_state_equals_one_metric_on_all_data() -> None:
    a, b, both = SnapDistance(), SnapDistance(), SnapDistance()
    w1, s1, w2, s2 = torch.randn(10), torch.randn(10), torch.randn(3), torch.randn(3)
    a.update(w1, s1)
    b.update(w2, s2)
    both.update(torch.cat([w1, w2]), torch.cat([s1, s2]))
    a.merge_state(b)
    assert _items(a.compute()) == pytest.approx(_items(both.compute()), rel=1e-12)


def test_snap_distance_states_reduce_by_sum_across_processes() -> None:
    a, b, both = SnapDistance(sync_on_compute=False), SnapDistance(), SnapDistance()
    w1, s1, w2, s2 = torch.randn(10), torch.randn(10), torch.randn(3), torch.randn(3)
    a.update(w1, s1)
    b.update(w2, s2)
    both.update(torch.cat([w1, w2]), torch.cat([s1, s2]))
    synced = _compute_as_two_ranks(a, b)
    assert _items(synced) == pytest.approx(_items(both.compute()), rel=1e-12)


def test_snap_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        SnapDistance().update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_snap_distance_rejects_integer_tensors() -> None:
    with pytest.raises(ValueError, match="snapped must be a floating-point tensor"):
        SnapDistance().update(torch.zeros(2), torch.zeros(2, dtype=torch.long))


# --- shared properties ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric", [AssignmentEntropy(), ClusterUsage(num_clusters=2), SnapDistance()]
)
def test_metrics_are_sum_reduced_and_need_no_full_state_update(metric: Metric) -> None:
    assert metric.full_state_update is False
    assert metric.is_differentiable is False
    assert all(fx is not None for fx in metric._reductions.values())
    assert all(isinstance(default, torch.Tensor) for default in metric._defaults.values())


@pytest.mark.parametrize(
    ("metric", "state"),
    [(AssignmentEntropy(), "entropy_sum"), (SnapDistance(), "sq_sum"), (SnapDistance(), "abs_sum")],
)
def test_float_sums_are_accumulated_in_float64(metric: Metric, state: str) -> None:
    assert getattr(metric, state).dtype == torch.float64


# -- reads back from the device ----------------------------------------------------------------
def test_usage_update_without_validation_reads_nothing_back() -> None:
    metric = ClusterUsage(4, num_palettes=2, validate_args=False)
    with count_host_syncs() as log:
        metric.update(torch.tensor([[0, 1, 1], [3, 3, 2]]))
    assert log.count == 0, log.calls
    assert metric.counts.tolist() == [[1, 2, 0, 0], [0, 0, 1, 2]]


def test_measuring_reads_each_tensors_statistics_back_once() -> None:
    """One read per tensor (its five statistics together) and one for the model's entropy."""
    from torch import nn

    from lightning_dkm import ClusterSpec, attach, select_targets
    from lightning_dkm.lightning.convergence import measure_all

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    tensors = attach(model, select_targets(model, ClusterSpec(bits=2), min_size=1))
    with count_host_syncs() as log:
        per_tensor, entropy = measure_all(tensors)
    assert log.count == len(tensors) + 1, log.calls
    assert set(per_tensor) == {"0.weight", "2.weight"} and 0 <= entropy <= 2


def test_the_models_entropy_is_the_mean_over_every_row_of_every_tensor() -> None:
    from torch import nn

    from lightning_dkm import ClusterSpec, attach, select_targets
    from lightning_dkm.lightning.convergence import measure_all

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    tensors = attach(model, select_targets(model, ClusterSpec(bits=2), min_size=1))
    per_tensor, entropy = measure_all(tensors)
    rows = {"0.weight": 64 * 64, "2.weight": 64 * 16}
    mean = sum(per_tensor[name]["entropy"] * n for name, n in rows.items()) / sum(rows.values())
    assert per_tensor["0.weight"]["entropy"] != per_tensor["2.weight"]["entropy"]
    assert entropy == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_logged_entropy_is_assignment_entropy_of_the_soft_assignments(bits: int) -> None:
    """``measure_all`` computes it from the logits; it is the metric's value on the
    parametrization's soft assignments, to float rounding."""
    from torch import nn

    from lightning_dkm import ClusterSpec, attach, select_targets
    from lightning_dkm.lightning.convergence import measure_all

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    tensors = attach(model, select_targets(model, ClusterSpec(bits=bits), min_size=1))
    per_tensor, _ = measure_all(tensors)
    for name, tensor in tensors.items():
        metric = AssignmentEntropy()
        for chunk in tensor.parametrization.soft_assignment_chunks(tensor.full_original()):
            metric.update(chunk)
        assert per_tensor[name]["entropy"] == pytest.approx(metric.compute().item(), rel=1e-6)
