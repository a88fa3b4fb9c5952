"""Specification of DKM under gradient accumulation (lightning_dkm.engine.accumulation and
DKMCallback with ``accumulate_grad_batches``): the soft weights are computed once per optimizer
step, DKM's backward runs once, and the gradients and centroids are those of one batch holding
all the micro-batches' samples."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import DealtWideNet, GradientRecorder, TinyNet, WideNet, trainer
from torch import nn
from torch.utils.checkpoint import checkpoint as run_checkpointed

from lightning_dkm import ClusterSpec, DKMCallback, attach, clustered_tensors, select_targets
from lightning_dkm.engine.accumulation import AccumulationWindow
from lightning_dkm.engine.clustering_pass import clustering_pass


def _callback() -> DKMCallback:
    return DKMCallback(bits=2, finalize=False, log_histograms=False, verbose=False)


def _first_step(tmp_path, batch_size: int, accumulate: int, model_class=WideNet,
                **options) -> dict:
    torch.manual_seed(0)
    model = model_class(batch_size=batch_size)
    recorder = GradientRecorder(options.pop("out_dir", None))
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=32 // batch_size,
                accumulate_grad_batches=accumulate, callbacks=[_callback(), recorder], **options)
    t.fit(model)
    return recorder.record


def _assert_same(record: dict, expected: dict) -> None:
    assert record.keys() == expected.keys()
    for name, value in expected.items():  # float32: the micro-batches sum in another order
        scale = float(value.abs().max()) if value.numel() else 0.0
        torch.testing.assert_close(record[name], value, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_micro_batches_give_the_gradients_and_centroids_of_one_batch_of_them_all(tmp_path):
    one_batch = _first_step(tmp_path / "one", batch_size=32, accumulate=1)
    accumulated = _first_step(tmp_path / "four", batch_size=8, accumulate=4)
    _assert_same(accumulated, one_batch)


def _counting_steps(model: nn.Module) -> list[str]:
    """Count each clustered weight's DKM step calls (the bound step, called through)."""
    calls: list[str] = []
    for name, tensor in clustered_tensors(model).items():
        p = tensor.parametrization
        step = p.step

        def counted(*args, _step=step, _name=name):
            calls.append(_name)
            return _step(*args)

        p.step = counted
    return calls


class _CountingCallback(DKMCallback):
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.calls = _counting_steps(pl_module)


@pytest.mark.parametrize(("batches", "accumulate", "steps"), [(6, 3, 2), (5, 2, 3), (4, 1, 4)])
def test_dkm_runs_once_per_optimizer_step_the_last_short_window_included(
    tmp_path, batches, accumulate, steps
):
    torch.manual_seed(0)
    callback = _CountingCallback(bits=2, finalize=False, log_histograms=False, verbose=False)
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=batches,
                accumulate_grad_batches=accumulate, callbacks=[callback])
    t.fit(TinyNet(batch_size=8))
    assert t.global_step == steps
    assert sorted(callback.calls) == sorted(["body.0.weight", "body.2.weight"] * steps)


def _window_step(model: nn.Module, batches: list[torch.Tensor], window: bool,
                 checkpoint: str | None = None) -> dict[str, torch.Tensor]:
    """The micro-batches' summed loss gradients, by a DKM step per micro-batch from the same
    centroids (the path without a window) or by one window."""
    tensors = clustered_tensors(model)
    start = {n: t.parametrization.centroids.clone() for n, t in tensors.items()}
    opened = AccumulationWindow(t.parametrization for t in tensors.values()) if window else None
    for i, x in enumerate(batches):
        if opened is None:
            for n, t in tensors.items():
                t.parametrization.centroids.copy_(start[n])
        else:
            opened.set_last(i == len(batches) - 1)
        with clustering_pass(model):
            out = (model(x) if checkpoint is None else
                   run_checkpointed(model, x, use_reentrant=checkpoint == "reentrant"))
        out.square().mean().backward()
    if opened is not None:
        opened.close()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _unique_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0),
           implementation="unique", temperature=3e-2)
    return model


@pytest.mark.parametrize("checkpoint", [None, "non_reentrant", "reentrant"])
def test_a_window_gives_the_summed_gradients_of_a_step_per_micro_batch(checkpoint):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 64, generator=g, requires_grad=True) for _ in range(3)]
    per_micro_batch = _window_step(_unique_model(), batches, window=False)
    windowed = _window_step(_unique_model(), batches, window=True, checkpoint=checkpoint)
    # Up to float summation order: a gradient that sums terms of the largest one's size and
    # cancels to a small one keeps their rounding, a few ulps of the largest (1.4e-6 of it on
    # one entry of 16,384 with the reentrant checkpoint's recomputation on one CPU type)
    for name, grad in per_micro_batch.items():
        torch.testing.assert_close(windowed[name], grad, rtol=1e-5,
                                   atol=4e-6 * float(grad.abs().max()), msg=name)


def test_a_window_whose_last_micro_batch_did_not_join_completes_at_close():
    """If the last micro-batch is not known in advance, closing the window runs DKM's
    backward for the gradient the micro-batches left in it."""
    model = _unique_model()
    tensors = clustered_tensors(model)
    window = AccumulationWindow(t.parametrization for t in tensors.values())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with clustering_pass(model):
        loss = model(x).square().mean()
    loss.backward()
    assert all(t.original.grad is None for t in tensors.values())
    window.close()
    assert all(t.original.grad is not None and t.parametrization.window is None
               for t in tensors.values())


def _close_an_unjoined_window(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import warnings

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _unique_model()
        window = AccumulationWindow(t.parametrization for t in clustered_tensors(model).values())
        with clustering_pass(model):
            loss = model(torch.randn(8, 64)).square().mean()
        loss.backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            window.close()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(messages))
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_a_window_completed_after_the_synchronisation_warns_naming_the_weights(
        tmp_path):
    """Under DDP a window whose last micro-batch did not read the clustered weights gets
    their DKM gradient after the ranks synchronised: each rank says so, naming the weights
    (silently, the ranks' weights would drift apart)."""
    torch.multiprocessing.spawn(
        _close_an_unjoined_window, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "did not read 0.weight, 2.weight" in message
        assert "this rank's gradients" in message


def test_validation_inside_a_window_snaps_and_leaves_the_window_alone():
    model = _unique_model()
    tensors = clustered_tensors(model)
    window = AccumulationWindow(t.parametrization for t in tensors.values())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with clustering_pass(model):
        soft = model[0].weight
    model.eval()
    snapped = model[0].weight
    assert torch.unique(snapped).numel() <= 4 and not torch.equal(snapped, soft)
    model.train()
    with clustering_pass(model):
        assert model[0].weight is soft  # the window's leaf, not a new step
        model(x).sum().backward()
    window.close()


# -- DDP: the all-reduce of the originals' gradients happens in the synchronised backward ------


@pytest.mark.slow
@pytest.mark.parametrize("find_unused", [False, True])
def test_under_ddp_micro_batches_give_the_gradients_of_one_batch_of_them_all(
    tmp_path, find_unused
):
    """Two processes (gloo) of 8-sample micro-batches, 2 per step: the first step's samples
    are the 32 of one single-process batch (dealt out in turn), so each rank's gradients are
    that batch's only after the all-reduce."""
    one_batch = _first_step(tmp_path / "one", batch_size=32, accumulate=1)
    out_dir = tmp_path / "ddp"
    out_dir.mkdir()
    _first_step(
        out_dir, batch_size=8, accumulate=2, model_class=DealtWideNet, out_dir=str(out_dir),
        devices=2, use_distributed_sampler=False,
        strategy=DDPStrategy(start_method="spawn", broadcast_buffers=False,
                             find_unused_parameters=find_unused),
    )
    for rank in (0, 1):
        record = torch.load(os.path.join(out_dir, f"gradients_rank{rank}.pt"), weights_only=True)
        _assert_same(record, one_batch)
