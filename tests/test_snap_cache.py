"""Specification of the snap cache: in a validation, test or predict loop each clustered weight
is snapped to its nearest centroid once per loop, not once per batch, and every forward sees
exactly what an uncached eval forward computes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import TinyNet, random_classification, trainer
from torch import nn
from torch.nn.utils import parametrize

import lightning_dkm.engine.parametrization as parametrization_module
from lightning_dkm import ClusterSpec, DKMCallback, PaletteLayout, clustered_tensors
from lightning_dkm.engine.parametrization import DKMParametrization
from lightning_dkm.engine.snap_cache import SnapCache, snap_cache

VAL_BATCHES = 8  # 64 validation samples in batches of 8


@pytest.fixture
def snaps(monkeypatch) -> list[int]:
    """Counts the nearest-centroid passes of the parametrizations' forwards: ``snaps[0]``."""
    count = [0]
    original = parametrization_module.hard_assign

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(parametrization_module, "hard_assign", counted)
    return count


def clustered_linear(per_channel_scale: bool = False) -> tuple[nn.Linear, DKMParametrization]:
    """A Linear(16, 8) whose weight is clustered at 2 bits, in eval mode."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    spec = ClusterSpec(2, 1, None, per_channel_scale=per_channel_scale)
    p = DKMParametrization(PaletteLayout((8, 16), spec, name="weight"))
    p.initialize(linear.weight)
    parametrize.register_parametrization(linear, "weight", p)
    return linear.eval(), p


def uncached(linear: nn.Linear, p: DKMParametrization, x: torch.Tensor) -> torch.Tensor:
    """The eval forward without any cache, under inference mode."""
    kept, p.snap_cache = p.snap_cache, None
    try:
        with torch.inference_mode():
            return linear(x)
    finally:
        p.snap_cache = kept


# -- the engine: one snap per tensor while open, the same values --------------------------------
@pytest.mark.parametrize("per_channel_scale", [False, True])
@pytest.mark.parametrize("grad_off", [torch.inference_mode, torch.no_grad])
def test_inside_the_cache_a_weight_is_snapped_once_and_every_forward_equals_the_uncached_one(
    snaps, per_channel_scale, grad_off
):
    linear, p = clustered_linear(per_channel_scale)
    xs = [torch.randn(4, 16) for _ in range(5)]
    expected = [uncached(linear, p, x) for x in xs]
    snaps[0] = 0
    with snap_cache([p]) as cache, grad_off():
        outputs = [linear(x) for x in xs]
        assert len(cache) == 1
    assert snaps[0] == 1
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected, strict=True))
    assert p.snap_cache is None and len(cache) == 0  # nothing kept past the close


def test_a_snap_off_the_host_is_not_kept():
    """On an accelerator a kept snap would be a second copy of the weight in its memory for the
    whole loop; only host-memory snaps are kept."""
    linear, p = clustered_linear(False)
    with snap_cache([p]) as cache, torch.no_grad():
        cache.put(p, linear.parametrizations.weight.original,
                  torch.empty(8, 16, device="meta"))
        assert len(cache) == 0
        cache.put(p, linear.parametrizations.weight.original, torch.zeros(8, 16))
        assert len(cache) == 1


def test_an_in_place_change_of_the_weight_centroids_or_scale_is_snapped_again(snaps):
    linear, p = clustered_linear(per_channel_scale=True)
    original = linear.parametrizations.weight.original
    x = torch.randn(4, 16)
    with snap_cache([p]), torch.no_grad():
        linear(x)
        for change in (lambda: original.mul_(1.5), lambda: p.centroids.mul_(0.5),
                       lambda: p.scale.mul_(2.0)):
            change()
            before = snaps[0]
            out = linear(x)
            assert snaps[0] == before + 1
            assert torch.equal(out, uncached(linear, p, x))


def test_a_grad_enabled_eval_forward_is_not_served_and_keeps_its_straight_through_gradient(
    snaps,
):
    linear, p = clustered_linear()
    original = linear.parametrizations.weight.original
    x = torch.randn(4, 16)
    with snap_cache([p]) as cache:
        with torch.inference_mode():
            linear(x)
        assert len(cache) == 1
        before = snaps[0]
        weight = linear.weight  # grad enabled: computed as without the cache
        assert snaps[0] == before + 1 and not weight.is_inference() and weight.requires_grad
        weight.sum().backward()
        assert torch.equal(original.grad, torch.ones_like(original))


def test_an_inference_tensor_is_never_served_outside_inference_mode(snaps):
    linear, p = clustered_linear()
    with snap_cache([p]):
        with torch.inference_mode():
            assert linear.weight.is_inference()
        before = snaps[0]
        with torch.no_grad():
            weight = linear.weight
        assert snaps[0] == before + 1 and not weight.is_inference()


def test_a_training_forward_never_reads_or_fills_the_cache(snaps):
    linear, p = clustered_linear()
    p.set_mode("hard")
    linear.train()
    with snap_cache([p]) as cache, torch.no_grad():
        first, second = linear.weight, linear.weight
        assert first is not second and snaps[0] == 2 and len(cache) == 0


# -- the callback: one snap per tensor per loop, in and outside fit ------------------------------
class RecordingNet(TinyNet):
    """TinyNet recording each evaluation batch's inputs and outputs, one list per loop."""

    def __init__(self) -> None:
        super().__init__(batch_size=VAL_BATCHES)
        self.loops: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def on_validation_epoch_start(self) -> None:
        self.loops.append([])

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def _record(self, batch) -> torch.Tensor:
        out = self(batch[0])
        self.loops[-1].append((batch[0], out))
        return out

    def validation_step(self, batch, batch_idx):
        self._record(batch)

    def test_step(self, batch, batch_idx):
        self._record(batch)

    def predict_step(self, batch, batch_idx):
        return self._record(batch)

    def predict_dataloader(self):
        return self.val_dataloader()


class LoopChecker(pl.Callback):
    """After DKMCallback's end of each evaluation loop (so its cache is closed): the snaps the
    loop made, and whether its outputs equal the uncached eval forward of the same weights."""

    def __init__(self, snaps: list[int]) -> None:
        self.snaps = snaps
        self.per_loop: list[int] = []
        self.equal: list[bool] = []
        self.first_outputs: list[torch.Tensor] = []

    def _start(self, trainer, pl_module) -> None:
        self.snaps[0] = 0

    def _end(self, trainer, pl_module) -> None:
        self.per_loop.append(self.snaps[0])
        assert all(t.parametrization.snap_cache is None
                   for t in clustered_tensors(pl_module).values())
        with torch.inference_mode():
            self.equal.append(all(torch.equal(pl_module(x), out)
                                  for x, out in pl_module.loops[-1]))
        self.first_outputs.append(pl_module.loops[-1][0][1].clone())

    on_validation_start = on_test_start = on_predict_start = _start
    on_validation_end = on_test_end = on_predict_end = _end


def test_a_validation_inside_fit_snaps_each_tensor_once_per_loop_and_sees_the_new_weights(
    tmp_path, snaps
):
    checker = LoopChecker(snaps)
    model = RecordingNet()
    t = trainer(tmp_path, max_epochs=2, callbacks=[DKMCallback(bits=2, finalize=False), checker],
                num_sanity_val_steps=2)
    t.fit(model)
    assert len(clustered_tensors(model)) == 2
    # the sanity check (2 batches), then each epoch's validation (8 batches)
    assert [len(loop) for loop in model.loops] == [2, VAL_BATCHES, VAL_BATCHES]
    # the sanity check runs before DKM starts (mode "dense": nothing to snap), then once per
    # tensor per loop however many batches it has
    assert checker.per_loop == [0, 2, 2]
    assert checker.equal == [True, True, True]
    # each loop saw the weights of its own time: training moved them in between
    first = checker.first_outputs
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


@pytest.mark.parametrize("loop", ["validate", "test", "predict"])
def test_validate_test_and_predict_outside_fit_snap_each_tensor_once(tmp_path, snaps, loop):
    callback = DKMCallback(bits=2, finalize=False)
    model = RecordingNet()
    trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(model)
    checker = LoopChecker(snaps)
    getattr(trainer(tmp_path, callbacks=[callback, checker]), loop)(model)
    assert len(model.loops[-1]) == len(random_classification(64)) // VAL_BATCHES
    assert checker.per_loop == [2] and checker.equal == [True]


def test_under_fsdp2_no_cache_is_opened(tmp_path, monkeypatch):
    """The callback's hook, with the trainer's FSDP2 answer set by hand (FSDP2 itself needs
    processes: ``test_fsdp_callback.py`` runs it end to end)."""
    callback = DKMCallback(bits=2, finalize=False)
    model = RecordingNet()
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback])
    t.fit(model)
    callback._open_snap_cache(t, model)
    assert all(p.parametrization.snap_cache is not None
               for p in clustered_tensors(model).values())
    callback._snap_cache.close()
    # what the trainer says under ModelParallelStrategy
    monkeypatch.setattr("lightning_dkm.lightning.callback.is_fully_sharded", lambda trainer: True)
    callback._open_snap_cache(t, model)
    assert all(p.parametrization.snap_cache is None for p in clustered_tensors(model).values())


def test_the_cache_is_closed_when_a_loop_fails(tmp_path):
    class Failing(RecordingNet):
        def validation_step(self, batch, batch_idx):
            self._record(batch)
            raise RuntimeError("boom")

    model = Failing()
    callback = DKMCallback(bits=2, finalize=False)
    trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(model)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, callbacks=[callback]).validate(model)
    assert all(p.parametrization.snap_cache is None for p in clustered_tensors(model).values())
    assert isinstance(callback._snap_cache, SnapCache) and len(callback._snap_cache) == 0
