"""The epsilon early stop of a DKM loop (``numerics.EarlyStop``): the same decisions on the
host, where it reads the moves back, and on the device, where it reads nothing back."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lightning_dkm.diagnostics import count_host_syncs
from lightning_dkm.engine.numerics import EarlyStop, Groups, sync_free


def _run(moves: list[list[float]], epsilon: float, groups: Groups | None, dtype: torch.dtype,
         on_device: bool) -> tuple[list[int], list[bool], torch.Tensor]:
    """Drives an EarlyStop through rounds whose centroids move by ``moves[r][p]`` per palette;
    returns the rounds each palette took, whether each round asked to stop, and the centroids
    kept at the end (each palette's moves summed while it ran)."""
    P = len(moves[0])
    like = torch.zeros(P, 1, 3, dtype=dtype)
    c = torch.zeros(P, 2, 1, dtype=dtype)
    stops = []
    with sync_free() if on_device else contextlib.nullcontext():
        stop = EarlyStop(epsilon, like, groups)
        for move in moves:
            new = c + torch.tensor(move, dtype=dtype).view(P, 1, 1)
            stops.append(stop.advance(c, new))
            c = stop.keep(new, c)
            if stops[-1]:
                break
        per_palette = stop.per_palette(P).tolist()
    return per_palette, stops, c


MOVES = [[0.5, 0.5, 0.5], [0.2, 1e-6, 0.3], [1e-6, 1e-6, 0.2], [1e-6, 1e-6, 1e-6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grouped", [False, True])
def test_the_host_and_the_device_stop_at_the_same_rounds_with_the_same_centroids(dtype,
                                                                                 grouped):
    groups = Groups(torch.tensor([0, 1, 1]), 2, (0, 1, 1)) if grouped else None
    host = _run(MOVES, 1e-4, groups, dtype, on_device=False)
    device = _run(MOVES, 1e-4, groups, dtype, on_device=True)
    assert host[0] == device[0]
    assert torch.equal(host[2], device[2])
    # without groups every palette runs until none moves: rounds 1-4 take effect
    # with groups, palette 0 (alone) stops after round 3 and keeps its centroid from then on
    assert host[0] == ([3, 4, 4] if grouped else [4, 4, 4])
    assert host[1][-1] is True and not any(device[1])  # the device never asks to break


@pytest.mark.parametrize("grouped", [False, True])
def test_a_nan_move_stops_its_group_on_the_host_as_on_the_device(grouped):
    """A NaN centroid (NaN or infinite weights) cannot converge: its group stops at once,
    wherever the stop is decided (before, the host without groups ran every round on)."""
    moves = [[0.5, 0.5], [math.nan, 0.3], [0.2, 0.2], [0.1, 0.1]]
    groups = Groups(torch.tensor([0, 1]), 2, (0, 1)) if grouped else None
    host = _run(moves, 1e-4, groups, torch.float32, on_device=False)
    device = _run(moves, 1e-4, groups, torch.float32, on_device=True)
    assert host[0] == device[0] == ([2, 4] if grouped else [2, 2])


def test_epsilon_is_compared_in_the_centroids_dtype():
    """A float64 move just above 0.1 goes on, as the device's float64 comparison has it, even
    where it lies below 0.1 rounded to float32 (0.10000000149)."""
    moves = [[0.5, 0.5], [0.1000000005, 0.1000000005], [0.0, 0.0]]
    groups = Groups(torch.tensor([0, 1]), 2, (0, 1))
    for g in (None, groups):
        host = _run(moves, 0.1, g, torch.float64, on_device=False)
        device = _run(moves, 0.1, g, torch.float64, on_device=True)
        assert host[0] == device[0] == [3, 3]


def test_without_epsilon_every_round_counts_and_nothing_is_read():
    like = torch.zeros(2, 1, 3)
    c = torch.zeros(2, 2, 1)
    with count_host_syncs() as log:
        stop = EarlyStop(0.0, like, Groups(torch.tensor([0, 1]), 2, (0, 1)))
        for _ in range(3):
            assert stop.advance(c, c + 1) is False
            assert torch.equal(stop.keep(c + 1, c), c + 1)
    assert log.calls == []
    assert stop.iterations == 3 and stop.rounds() == 3
    assert stop.per_palette(2).tolist() == [3, 3]


def test_on_the_device_nothing_is_read_back():
    groups = Groups(torch.tensor([0, 1, 1]), 2, (0, 1, 1))
    like = torch.zeros(3, 1, 3)
    c = torch.zeros(3, 2, 1)
    with sync_free(), count_host_syncs() as log:
        stop = EarlyStop(1e-4, like, groups)
        for move in MOVES:
            new = c + torch.tensor(move).view(3, 1, 1)
            assert stop.advance(c, new) is False
            c = stop.keep(new, c)
        per_palette = stop.per_palette(3)
        assert stop.rounds() is None
    assert log.calls == []
    assert per_palette.tolist() == [3, 4, 4]


@pytest.mark.parametrize("where", ["host", "host, grouped", "device", "device, grouped"])
def test_the_counts_are_an_int_a_list_per_group_or_a_tensor_on_the_device(where):
    grouped = "grouped" in where
    groups = Groups(torch.tensor([0, 1, 1]), 2, (0, 1, 1)) if grouped else None
    like, c = torch.zeros(3, 1, 3), torch.zeros(3, 2, 1)
    with sync_free() if where.startswith("device") else contextlib.nullcontext():
        stop = EarlyStop(1e-4, like, groups)
        for move in MOVES:
            new = c + torch.tensor(move).view(3, 1, 1)
            done = stop.advance(c, new)
            c = stop.keep(new, c)
            if done:
                break
    if where == "host":
        assert stop.iterations == 4 and stop.rounds() == 4
    elif where == "host, grouped":
        assert stop.iterations == [3, 4] and stop.rounds() is None  # they differ
    else:
        assert isinstance(stop.iterations, torch.Tensor) and stop.rounds() is None
        assert stop.iterations.tolist() == (4 if groups is None else [3, 4])


def test_a_batch_whose_groups_stop_together_knows_its_one_count():
    groups = Groups(torch.tensor([0, 1]), 2, (0, 1))
    moves = [[0.5, 0.5], [0.2, 0.3], [1e-6, 1e-6]]
    like, c = torch.zeros(2, 1, 3), torch.zeros(2, 2, 1)
    stop = EarlyStop(1e-4, like, groups)
    for move in moves:
        new = c + torch.tensor(move).view(2, 1, 1)
        done = stop.advance(c, new)
        c = stop.keep(new, c)
    assert done is True and stop.iterations == [3, 3] and stop.rounds() == 3
