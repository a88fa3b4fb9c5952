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


def run(tmp_path, method, *callbacks, ckpt_path=None, **dkm_kwargs):
    torch.manual_seed(0)  # the same initial weights in every run
    model = TinyNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    # refresh_every=3: Deep k-Means refreshes its assignments mid-epoch (4 steps an epoch), so
    # a resume at an epoch boundary must restore them rather than refresh them.
    if method == "deep_kmeans":
        dkm_kwargs["refresh_every"] = 3
    dkm = DKMCallback(bits=2, finalize=False, method=method, **dkm_kwargs)
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


def dkm_state(checkpoint) -> dict:
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DKMCallback")]
    return checkpoint["callbacks"][key]["model"]


def test_centroids_are_restored(resumed):
    _, checkpoint, spy, _, _, _ = resumed
    for name, centroids in spy.centroids.items():
        module, param = name.rsplit(".", 1)
        key = f"{module}.parametrizations.{param}.0.centroids"
        assert torch.equal(centroids, dkm_state(checkpoint)["tensors"][name]["entries"][key])


def test_the_checkpoint_loads_into_a_plain_model_with_its_weights_snapped(resumed):
    _, checkpoint, _, _, _, _ = resumed
    plain = TinyNet()
    plain.load_state_dict(checkpoint["state_dict"])  # strict: plain keys only
    for name in ("body.0.weight", "body.2.weight"):
        assert torch.unique(plain.get_parameter(name)).numel() <= 4, name


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


def test_the_checkpoint_holds_plain_weights_and_the_dkm_state_under_the_callbacks_key(resumed):
    _, checkpoint, _, _, _, _ = resumed
    assert not any("parametrizations" in key for key in checkpoint["state_dict"])
    state = dkm_state(checkpoint)
    assert set(state["tensors"]) == {"body.0.weight", "body.2.weight"}
    entries = state["tensors"]["body.0.weight"]["entries"]
    assert set(entries) == {
        "body.0.parametrizations.weight.original",
        "body.0.parametrizations.weight.0.centroids",
        "body.0.parametrizations.weight.0.temperature",
        "body.0.parametrizations.weight.0.initialized",
    }


# -- a callable temperature, and checkpoints written before the plain format ------------------
def decaying_tau(unit: int) -> float:
    """A temperature given as a plain callable: tau = 0.1 * 0.8**unit (a unit is a soft step)."""
    return 0.1 * 0.8**unit


@pytest.fixture(scope="module")
def callable_runs(tmp_path_factory):
    """With ``temperature=decaying_tau``: an uninterrupted run, a run resumed from a crash, and
    one resumed from a checkpoint with the DKM keys in its state_dict (the format before the
    plain one: the callback's on_save_checkpoint did not run)."""
    straight = StateSpy()
    uninterrupted = run(tmp_path_factory.mktemp("callable_straight"), "dkm", straight,
                        temperature=decaying_tau)
    resumed = {}
    for label, old_format in (("plain", False), ("dkm_keys", True)):
        tmp_path = tmp_path_factory.mktemp(f"callable_{label}")
        with pytest.MonkeyPatch.context() as patch:
            if old_format:
                patch.setattr(DKMCallback, "on_save_checkpoint", lambda *args: None)
            with pytest.raises(RuntimeError, match="deliberate crash"):
                run(tmp_path, "dkm", Crash(), temperature=decaying_tau)
        last = tmp_path / "ckpt" / "last.ckpt"
        checkpoint = torch.load(last, weights_only=True)
        spy = StateSpy()
        model = run(tmp_path, "dkm", spy, ckpt_path=str(last), temperature=decaying_tau)
        resumed[label] = (checkpoint, spy, model)
    return uninterrupted, straight, resumed


def test_a_callable_temperature_resumes_on_its_schedule(callable_runs):
    _, straight, resumed = callable_runs
    _, spy, _ = resumed["plain"]
    assert sorted(spy.taus) == list(range(8, 16))
    for step, taus in spy.taus.items():
        assert taus == pytest.approx({n: decaying_tau(step) for n in taus}, rel=1e-6), step
        assert taus == straight.taus[step], step


def test_a_callable_temperature_is_saved_by_name_only(callable_runs):
    _, _, resumed = callable_runs
    checkpoint, _, _ = resumed["plain"]
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DKMCallback")]
    config = checkpoint["callbacks"][key]["temperature_config"]
    assert config == {"schedule": "callable", "fn": f"{__name__}.decaying_tau",
                      "interval": "step"}


@pytest.mark.parametrize("label", ["plain", "dkm_keys"])
def test_a_resumed_run_with_a_callable_temperature_ends_where_an_uninterrupted_one_ends(
    callable_runs, label
):
    uninterrupted, _, resumed = callable_runs
    checkpoint, _, model = resumed[label]
    has_dkm_keys = any("parametrizations" in key for key in checkpoint["state_dict"])
    assert has_dkm_keys == (label == "dkm_keys")
    expected = uninterrupted.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, value in model.state_dict().items():
        assert torch.allclose(value.float(), expected[name].float(), atol=1e-6), name
