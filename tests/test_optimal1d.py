"""Specification of optimal 1-D k-means (lightning_dkm.engine.optimal1d, through kmeans()).

Scalar palettes get the optimal partition: the least weighted sum of squared distances over
every partition into k groups, found by a dynamic program over the sorted values. Small
palettes are solved on their exact distinct values (checked here against brute force over
every partition); larger ones on a grid of cells refined around the boundaries (checked
against the exact program on the same values, and against Lloyd's local optima).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import lightning_dkm.engine.kmeans as kmeans_module
import lightning_dkm.engine.optimal1d as optimal1d
from lightning_dkm.engine.kmeans import (
    kmeans,
    kmeans_centroids,
    kmeans_plusplus,
    kmeans_widths,
    lloyd,
    nearest_centroid,
)
from lightning_dkm.engine.optimal1d import (
    optimal_kmeans_1d,
    optimal_kmeans_1d_many,
    optimal_kmeans_1d_widths,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inertia(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Per palette: the (weighted) squared distance of every point to its nearest centroid,
    in float64."""
    d = (x.double() - c.double().transpose(-1, -2)).square().amin(-1)  # scalars: (P, n, k)
    return (d if w is None else d * w.double()).sum(-1)


def brute_force(values: torch.Tensor, weights: torch.Tensor, k: int) -> float:
    """The least weighted inertia over every partition of the sorted distinct values into
    min(k, distinct) contiguous groups (in one dimension the optimum is such a partition)."""
    distinct, inverse = torch.unique(values.double(), return_inverse=True)
    w = torch.zeros(len(distinct), dtype=torch.float64).index_add_(0, inverse, weights.double())
    m = len(distinct)
    best = float("inf")
    for cuts in itertools.combinations(range(1, m), min(k, m) - 1):
        bounds = (0, *cuts, m)
        cost = 0.0
        for a, b in itertools.pairwise(bounds):
            mean = (w[a:b] * distinct[a:b]).sum() / w[a:b].sum()
            cost += float((w[a:b] * (distinct[a:b] - mean) ** 2).sum())
        best = min(best, cost)
    return best


def lloyd_inertia(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """What the previous seeding found: k-means++ then Lloyd, one palette at a time."""
    seeds = kmeans_plusplus(x, k, seeded(seed))
    return inertia(x, lloyd(x, seeds, max_iter=300).centroids)


# -- optimality --------------------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(40))
def test_the_result_is_the_best_of_every_partition(trial: int) -> None:
    g = seeded(trial)
    n = int(torch.randint(2, 10, (1,), generator=g))
    k = int(torch.randint(1, 5, (1,), generator=g))
    if trial % 2:  # ties: values on a coarse grid repeat
        x = torch.randint(-3, 4, (2, n), generator=g).float() * 0.25
    else:
        x = torch.randn(2, n, generator=g)
    w = torch.rand(2, n, generator=g) + 0.05
    centroids, filled = optimal_kmeans_1d(x, k, w)
    for p in range(2):
        found = inertia(x[p].view(1, -1, 1), centroids[p][filled[p]].view(1, -1, 1), w[p:p + 1])
        assert float(found) == pytest.approx(brute_force(x[p], w[p], k), rel=1e-9, abs=1e-12)


def test_centroids_ascend_and_are_the_means_of_their_members(gen) -> None:
    x = torch.randn(1, 500, 1, generator=gen)
    result = kmeans(x, 8)
    c = result.centroids[0, :, 0]
    assert bool((c[1:] > c[:-1]).all())
    for j in range(8):
        members = x[0, result.labels[0] == j, 0]
        assert float(c[j]) == pytest.approx(float(members.double().mean()), rel=1e-6)


def test_a_count_weighs_as_repeated_values(gen) -> None:
    values = torch.randn(1, 40, generator=gen)
    counts = torch.randint(1, 5, (1, 40), generator=gen)
    repeated = values.repeat_interleave(counts[0], dim=1)
    weighted, _ = optimal_kmeans_1d(values, 5, counts.float())
    plain, _ = optimal_kmeans_1d(repeated, 5)
    torch.testing.assert_close(weighted, plain, rtol=1e-12, atol=1e-12)


def test_sample_weights_pull_the_centroids() -> None:
    x = torch.tensor([[0.0, 1.0, 10.0, 11.0]])
    heavy_right = torch.tensor([[1.0, 1.0, 1.0, 9.0]])
    c, _ = optimal_kmeans_1d(x, 2, heavy_right)
    assert c[0].tolist() == pytest.approx([0.5, 10.9])


# -- fewer values than centroids, constant and half-precision palettes ------------------------
def test_k_at_least_the_distinct_values_gives_each_value_its_own_centroid() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 1.0, 3.0, 2.0]).view(1, 6, 1)
    with pytest.warns(UserWarning, match="fewer distinct values than k=5"):
        result = kmeans(x, 5, name="w")
    c = result.centroids[0, :, 0]
    assert c[:3].tolist() == [1.0, 2.0, 3.0]
    assert bool((c[3:] > 3.0).all()) and torch.unique(c).numel() == 5  # distinct placeholders
    assert result.inertia.item() == 0.0
    assert torch.equal(c[result.labels[0]], x[0, :, 0])


def test_k_equal_to_the_distinct_values_needs_no_placeholder() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(5).view(1, 20, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = kmeans(x, 4)
    assert result.centroids.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("n", [100, 20_000])  # the distinct values, and the grid
def test_a_constant_palette_has_zero_inertia(n: int) -> None:
    x = torch.full((1, n, 1), -0.75)
    with pytest.warns(UserWarning, match="fewer distinct values"):
        result = kmeans(x, 4)
    c = result.centroids[0, :, 0]
    assert c[0].item() == -0.75 and torch.unique(c).numel() == 4
    assert result.inertia.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_palettes_get_the_optimum_of_their_values(dtype, gen) -> None:
    x = (0.02 * torch.randn(1, 3000, 1, generator=gen)).to(dtype)
    result = kmeans(x, 8)
    assert result.centroids.dtype == dtype
    exact, _ = optimal_kmeans_1d(x.float().view(1, -1), 8)
    torch.testing.assert_close(result.centroids.float().view(1, -1), exact.float(),
                               rtol=2 ** -7, atol=0)


# -- the grid (palettes above the exact size) -----------------------------------------------------
@pytest.mark.parametrize("data", ["normal", "student_t", "outlier"])
def test_the_grid_finds_the_optimum_of_the_exact_program(data: str, monkeypatch) -> None:
    g = seeded(1)
    n = 20_000
    if data == "normal":
        x = torch.randn(1, n, generator=g)
    elif data == "student_t":
        x = torch.distributions.StudentT(3.0).sample((1, n))
    else:  # one weight far from the rest: the grid is coarse next to the others
        x = torch.randn(1, n, generator=g)
        x[0, 0] = 500.0
    k = 8
    grid, _ = optimal_kmeans_1d(x, k)
    monkeypatch.setattr(optimal1d, "MAX_BINS", n)  # every distinct value a bin: exact
    exact, _ = optimal_kmeans_1d(x, k)
    got, best = inertia(x.view(1, -1, 1), grid.view(1, -1, 1)), inertia(
        x.view(1, -1, 1), exact.view(1, -1, 1))
    assert float(got) <= float(best) * (1 + 1e-6)


def test_values_crowded_into_fewer_grid_cells_than_k_get_the_exact_program(gen,
                                                                           monkeypatch) -> None:
    # 19,990 distinct values within 1e-6 of 0 share one grid cell (the range is set by ten
    # far weights near 1000, a cell of each): 11 occupied cells for 16 runs. The distinct
    # values then decide, and the result is the exact program's.
    x = torch.cat([torch.rand(1, 19_990, generator=gen) * 1e-6,
                   1000.0 + torch.arange(10.0).view(1, 10)], dim=1)
    k = 16
    got, filled = optimal_kmeans_1d(x, k)
    monkeypatch.setattr(optimal1d, "MAX_BINS", x.shape[1])  # every distinct value a bin: exact
    exact, _ = optimal_kmeans_1d(x, k)
    assert bool(filled.all())
    assert float(inertia(x.view(1, -1, 1), got.view(1, -1, 1))) <= float(
        inertia(x.view(1, -1, 1), exact.view(1, -1, 1))) * (1 + 1e-6)


@pytest.mark.parametrize(("n", "k"), [(2_000, 4), (2_000, 16), (12_000, 4), (12_000, 16)])
def test_never_worse_than_lloyd(n: int, k: int) -> None:
    for seed in range(3):
        x = torch.distributions.StudentT(4.0).sample((1, n, 1)) * 0.02
        ours = inertia(x, kmeans(x, k).centroids)
        assert float(ours) <= float(lloyd_inertia(x, k, seed)) * (1 + 1e-6)


def test_palettes_solved_together_match_each_solved_alone(gen) -> None:
    x = torch.randn(3, 12_000, generator=gen) * torch.tensor([[1.0], [1e-3], [50.0]])
    together, _ = optimal_kmeans_1d(x, 4)
    for p in range(3):
        alone, _ = optimal_kmeans_1d(x[p : p + 1], 4)
        torch.testing.assert_close(together[p : p + 1], alone, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [4, 16, 32])  # labels counted up to 16 centroids, searched above
def test_labels_are_the_nearest_centroid_and_a_midpoint_goes_to_the_lower_one(k, gen) -> None:
    x = torch.randn(2, 3_000, 1, generator=gen)
    result = kmeans(x, k)
    assert torch.equal(result.labels, nearest_centroid(x, result.centroids))
    c = result.centroids
    midpoints = (c[:, 1:] + c[:, :-1]) / 2
    assert torch.equal(kmeans_module._nearest_ascending(midpoints, c),
                       torch.arange(k - 1).expand(2, -1))



@pytest.mark.parametrize("shape", [(3, 1_000), (2, 5), (1, 0)])
def test_labels_counted_piece_by_piece_are_the_nearest_centroid(shape, gen, monkeypatch
                                                                 ) -> None:
    monkeypatch.setattr(kmeans_module, "_LABEL_PIECE", 64)  # pieces across rows and columns
    x = torch.randn(*shape, 1, generator=gen)
    c = torch.sort(torch.randn(shape[0], 8, 1, generator=gen), dim=1).values
    assert torch.equal(kmeans_module._nearest_ascending(x, c), nearest_centroid(x, c))

def _mixed_problems(gen: torch.Generator) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
    """Tensors of every kind a model holds, solved together below: distinct-value palettes
    and grid ones, several sizes and k, groups of palettes, sample weights, one distinct value,
    fewer distinct values than k, and two tensors whose programs have the same size."""
    return [
        (torch.randn(1, 5_000, generator=gen), 16, None),  # distinct values
        (torch.randn(1, 5_000, generator=gen) * 3, 16, None),  # the same program size
        (torch.randn(1, 12_000, generator=gen), 16, None),  # grid
        (torch.randn(1, 12_000, generator=gen) * 1e-3, 16, None),  # grid, the same size
        (torch.distributions.StudentT(4.0).sample((3, 10_000)) * 0.02, 4, None),  # 3 palettes
        (torch.randn(2, 700, generator=gen), 8, torch.rand(2, 700, generator=gen)),  # weighted
        (torch.full((1, 3_000), 0.25), 16, None),  # one distinct value
        (torch.randint(-2, 3, (2, 10_000), generator=gen).float(), 16, None),  # 5 < k values
        (torch.randn(0, 100, generator=gen), 4, None),  # no palettes
    ]


def test_tensors_solved_together_get_bit_for_bit_what_each_gets_alone(gen) -> None:
    problems = _mixed_problems(gen)
    together = optimal_kmeans_1d_many(problems)
    assert len(together) == len(problems)
    for (x, k, w), (centroids, filled) in zip(problems, together, strict=True):
        alone, alone_filled = optimal_kmeans_1d(x, k, w)
        assert torch.equal(filled, alone_filled)
        assert torch.equal(centroids[filled], alone[alone_filled])
        assert centroids.shape == (x.shape[0], k)


def test_tensors_solved_in_bounded_rounds_get_the_same_centroids(gen, monkeypatch) -> None:
    problems = _mixed_problems(gen)
    at_once = optimal_kmeans_1d_many(problems)
    monkeypatch.setattr(optimal1d, "_HELD_BINS", 1)  # one palette set at a time
    for (c, f), (one_by_one, f1) in zip(at_once, optimal_kmeans_1d_many(problems), strict=True):
        assert torch.equal(f, f1) and torch.equal(c[f], one_by_one[f1])


def _width_problems(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Palettes that ``average_bits``' estimate solves at several k: grid values with
    counts (as it does), plain values with ties, palettes of different distinct counts side
    by side, one with fewer distinct values than the largest k, and one on the grid path."""
    grid = torch.round(torch.randn(4, 1_025, generator=gen) * 100) / 512
    return [
        (grid, torch.randint(0, 50, (4, 1_025), generator=gen).float()),  # counts, some 0
        (torch.round(torch.randn(3, 2_000, generator=gen) * 20), None),  # ties
        (torch.cat([torch.randn(1, 600, generator=gen),  # 600 and 7 distinct values
                    torch.randint(0, 7, (1, 600), generator=gen).float()]), None),
        (torch.randint(0, 5, (2, 300), generator=gen).float(), None),  # 5 < 16 values
        (torch.randn(1, 12_000, generator=gen), None),  # the grid path
    ]


@pytest.mark.filterwarnings("ignore:.*fewer distinct values than k")
@pytest.mark.parametrize("case", range(5))
def test_one_program_for_several_k_gets_bit_for_bit_what_each_k_gets_alone(case, gen) -> None:
    x, w = _width_problems(gen)[case]
    ks = (2, 4, 8, 16)
    for k, (centroids, filled) in zip(ks, optimal_kmeans_1d_widths(x, ks, w), strict=True):
        alone, alone_filled = optimal_kmeans_1d(x, k, w)
        assert torch.equal(filled, alone_filled)
        assert torch.equal(centroids[filled], alone[alone_filled])
    for k, result in zip(ks, kmeans_widths(x.unsqueeze(-1), ks, w), strict=True):
        alone = kmeans(x.unsqueeze(-1), k, sample_weight=w)
        assert all(torch.equal(a, b) for a, b in zip(result, alone, strict=True)), k


def test_several_k_of_distinct_values_cost_one_program(gen, monkeypatch) -> None:
    """The largest k's program holds every smaller k's rows: one program (15 rows for 2..16
    centroids) instead of four (26 rows)."""
    calls = []
    solve = optimal1d._optimal_starts
    monkeypatch.setattr(optimal1d, "_optimal_starts",
                        lambda prefix, ks: calls.append(max(ks)) or solve(prefix, ks))
    x, w = _width_problems(gen)[0]
    optimal_kmeans_1d_widths(x, (2, 4, 8, 16), w)
    assert calls == [16]


# -- scale, determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3_000, 12_000])
@pytest.mark.parametrize("c", [2.0 ** -66, 2.0 ** 66])
def test_weights_scaled_by_a_power_of_two_get_scaled_centroids_bit_for_bit(n, c, gen) -> None:
    x = torch.randn(2, n, 1, generator=gen)
    assert torch.equal(kmeans_centroids(x * c, 8), kmeans_centroids(x, 8) * c)
    assert torch.equal(kmeans(x * c, 8).labels, kmeans(x, 8).labels)


@pytest.mark.parametrize("c", [1e-20, 1e20])
def test_weights_of_any_magnitude_cluster_as_unit_ones(c, gen) -> None:
    x = torch.randn(1, 12_000, 1, generator=gen)
    torch.testing.assert_close(kmeans_centroids(x * c, 8) / c, kmeans_centroids(x, 8),
                               rtol=1e-5, atol=0)


def test_the_same_values_give_the_same_centroids_whatever_the_seed(gen) -> None:
    x = torch.randn(2, 12_000, 1, generator=gen)
    first = kmeans(x, 16, seeded(0))
    again = kmeans(x, 16, seeded(123), n_init=3)
    assert torch.equal(first.centroids, again.centroids)
    assert torch.equal(first.labels, again.labels)
    assert torch.equal(kmeans_centroids(x, 16), first.centroids)


def test_the_programs_c_loop_gives_the_pytorch_ops_starts_bit_for_bit():
    """Where the native library is built, the dynamic program runs as one C loop
    (``dkm_optimal_choices``) instead of vectorised ops per level: the same run starts for
    every width, on ties (rounded values), values of 1e-20, bins of weight 0 and fewer bins
    than runs (padded), bit for bit."""
    from lightning_dkm.engine import native
    from lightning_dkm.engine import optimal1d as o

    if native.loops_for(torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip(f"the native loops are not built here: {native.build_failure()}")
    gen = torch.Generator().manual_seed(0)
    for case in range(120):
        P, M = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 200, (1,),
                                                                                   generator=gen))
        values = torch.randn(P, M, generator=gen, dtype=torch.float64)
        values = {0: values, 1: values.round(), 2: values * 1e-20}.get(case % 4, values)
        weights = torch.rand(P, M, generator=gen, dtype=torch.float64)
        if case % 4 == 3:
            weights[weights < 0.3] = 0.0
        values = values.sort(1).values
        prefix = o._prefix(o._Bins(weights, weights * values, torch.zeros(P, 1,
                                                                         dtype=torch.float64)))
        ks = sorted({int(k) for k in torch.randint(1, 20, (3,), generator=gen)})
        fast = o._optimal_starts(prefix, ks)
        with native.turned_off():
            by_ops = o._optimal_starts(prefix, ks)
        assert all(torch.equal(a, b) for a, b in zip(fast, by_ops, strict=True)), (case, ks)
    loops = native.loops_for(prefix)
    assert loops.optimal_choices(prefix.float(), 2, o._TINY) is None  # float64 only
    assert loops.optimal_choices(prefix, prefix.shape[2], o._TINY) is None  # k > M: padded first
    assert loops.optimal_choices(prefix[:, :, ::2], 2, o._TINY) is None  # not contiguous
