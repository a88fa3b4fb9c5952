"""A run interrupted mid-clustering resumes from its checkpoint to the same tau, centroids,
method state and optimizer state, and ends where an uninterrupted run ends, for every method."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyNet, trainer

from lightning_dkm import DKMCallback, clustered_tensors
from lightning_dkm.model.methods import METHOD_NAMES


class Crash(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("deliberate crash")


class StateSpy(pl.Callback):
    """Captures the restored state when training (re)starts and every tensor's tau at each
    optimizer step (the default temperature: calibrated bounds, annealed per step)."""

    def __init__(self) -> None:
        self.taus: dict[int, dict[str, float]] = {}

    def on_train_start(self, trainer, pl_module):
        self.centroids = {
            n: t.parametrization.centroids.clone() for n, t in clustered_tensors(pl_module).items()
        }
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.taus[trainer.global_step] = {
            n: float(t.parametrization.temperature) for n, t in clustered_tensors(pl_module).items()
        }


def run(tmp_path, method, *callbacks, ckpt_path=None):
    torch.manual_seed(0)  # the same initial weights in every run
    model = TinyNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    # refresh_every=3: Deep k-Means refreshes its assignments mid-epoch (4 steps an epoch), so
    # a resume at an epoch boundary must restore them rather than refresh them.
    dkm = DKMCallback(bits=2, finalize=False, method=method, refresh_every=3)
    t = trainer(tmp_path, max_epochs=4, enable_checkpointing=True,
                callbacks=[dkm, checkpoint, *callbacks])
    t.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module", params=METHOD_NAMES)
def resumed(request, tmp_path_factory):
    method = request.param
    tmp_path = tmp_path_factory.mktemp(f"resume_{method}")
    with pytest.raises(RuntimeError, match="deliberate crash"):
        run(tmp_path, method, Crash())
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    spy = StateSpy()
    model = run(tmp_path, method, spy, ckpt_path=str(last))
    straight = StateSpy()
    uninterrupted = run(tmp_path_factory.mktemp(f"straight_{method}"), method, straight)
    return method, checkpoint, spy, model, uninterrupted, straight


def test_centroids_are_restored(resumed):
    _, checkpoint, spy, _, _, _ = resumed
    for name, centroids in spy.centroids.items():
        module, param = name.rsplit(".", 1)
        key = f"{module}.parametrizations.{param}.0.centroids"
        assert torch.equal(centroids, checkpoint["state_dict"][key])


def test_optimizer_state_is_restored(resumed):
    _, checkpoint, spy, _, _, _ = resumed
    saved = checkpoint["optimizer_states"][0]["state"]
    restored = spy.optimizer_state["state"]
    assert saved.keys() == restored.keys()
    for index in saved:
        assert torch.equal(saved[index]["momentum_buffer"], restored[index]["momentum_buffer"])


def test_tau_continues_on_the_schedule(resumed):
    _, _, spy, _, _, straight = resumed
    assert sorted(spy.taus) == list(range(8, 16))  # epochs 2 and 3, 4 steps each
    for step, taus in spy.taus.items():  # the same calibrated bounds, the same step
        assert taus == straight.taus[step], step


def test_resumed_run_ends_where_an_uninterrupted_run_ends(resumed):
    _, _, _, model, uninterrupted, _ = resumed
    expected = uninterrupted.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, value in model.state_dict().items():
        assert torch.allclose(value.float(), expected[name].float(), atol=1e-6), name
