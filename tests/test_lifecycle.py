"""DKMCallback's lifecycle edges: fits that end before DKM starts, bad output directories, tied
weights, re-fitting a finalized model, and the configuration mistakes users make."""

from __future__ import annotations

import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TiedNet, TinyNet, trainer
from torch import nn

from lightning_dkm import ClusterSpec, DKMCallback, attach, clustered_tensors, finalize
from lightning_dkm.model.targets import select_targets


def fit(tmp_path, callback: DKMCallback | None, model: nn.Module | None = None, **kwargs):
    torch.manual_seed(0)
    model = model or TinyNet()
    callbacks = ([callback] if callback is not None else []) + kwargs.pop("extra_callbacks", [])
    t = trainer(tmp_path, callbacks=callbacks, **kwargs)
    t.fit(model)
    return model, t


class BatchCounter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


# -- a fit that ends before DKM starts ------------------------------------------------------------
@pytest.mark.parametrize(
    "limits",
    [
        {"max_epochs": 2},  # start_epoch == max_epochs
        {"max_epochs": 5, "max_steps": 3},  # max_steps ends fit inside epoch 0
    ],
    ids=["max_epochs", "max_steps"],
)
def test_a_fit_that_ends_before_start_epoch_leaves_the_trained_model_undamaged(tmp_path, limits):
    plain, _ = fit(tmp_path / "plain", None, **limits)
    cb = DKMCallback(bits=2, start_epoch=2, temperature=1e-2, save_dir=str(tmp_path / "dkm"))
    with pytest.warns(UserWarning, match=r"before DKM started \(start_epoch=2\).*NOT clustered"):
        model, _ = fit(tmp_path, cb, **limits)
    assert type(model.body[0]) is nn.Linear and not hasattr(model.body[0], "parametrizations")
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name  # as trained, not snapped
    assert torch.unique(model.body[0].weight).numel() > 4
    assert cb.report is None and cb.palettes == {} and cb.artifact_path is None
    assert not (tmp_path / "dkm" / "model.dkm.safetensors").exists()


def test_early_stopping_before_start_epoch_leaves_the_model_undamaged(tmp_path):
    stop = EarlyStopping(monitor="val_loss", patience=0, stopping_threshold=1e9)  # stops at once
    cb = DKMCallback(bits=2, start_epoch=3, save_dir=str(tmp_path / "dkm"))
    with pytest.warns(UserWarning, match=r"start_epoch=3"):
        model, t = fit(tmp_path, cb, max_epochs=6, extra_callbacks=[stop])
    assert t.current_epoch < 3
    assert type(model.body[2]) is nn.Linear
    assert torch.unique(model.body[2].weight).numel() > 4
    assert cb.report is None


def test_max_epochs_not_past_start_epoch_is_announced_at_setup(tmp_path):
    with pytest.warns(UserWarning, match=r"max_epochs=2 <= start_epoch=2.*never starts"):
        fit(tmp_path, DKMCallback(bits=2, start_epoch=2, finalize=False), max_epochs=2)


def test_finalize_refuses_never_initialised_centroids_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(64, 64))
    before = model[0].weight.detach().clone()
    attach(model, select_targets(model, ClusterSpec(bits=2), min_size=0), initialize=False)
    with pytest.raises(RuntimeError, match=r"0\.weight.*initiali[sz]ed"):
        finalize(model)
    assert set(clustered_tensors(model)) == {"0.weight"}  # nothing was removed or snapped
    assert torch.equal(clustered_tensors(model)["0.weight"].original.detach(), before)


# -- the output directory --------------------------------------------------------------------------
def test_a_save_dir_that_is_a_file_fails_at_setup_naming_save_dir(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    counter = BatchCounter()
    with pytest.raises(MisconfigurationException, match=r"save_dir=.*taken.*is a file"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(blocker)), extra_callbacks=[counter])
    assert counter.batches == 0  # refused before any training


def test_a_save_dir_under_a_file_fails_at_setup_naming_save_dir(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    with pytest.raises(MisconfigurationException, match=r"save_dir=.*cannot be created"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(blocker / "dkm")))


def test_the_default_save_dir_is_under_the_default_root_dir_without_a_logger(tmp_path):
    cb = DKMCallback(bits=2)
    fit(tmp_path, cb, logger=False)
    assert cb.artifact_path == tmp_path / "dkm" / "model.dkm.safetensors"
    assert cb.artifact_path.is_file()
    assert cb.output_paths["json"].is_file()


# -- the temperature schedule and the Trainer's limits ---------------------------------------------
def test_an_epoch_schedule_without_an_epoch_limit_names_max_epochs_and_max_steps(tmp_path):
    cb = DKMCallback(bits=2, temperature={"start": 1e-1, "end": 1e-3, "interval": "epoch"})
    with pytest.raises(MisconfigurationException, match=r"max_epochs=-1, max_steps=4"):
        fit(tmp_path, cb, max_epochs=-1, max_steps=4)


def test_a_step_schedule_without_any_limit_names_max_epochs_and_max_steps(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"max_epochs=-1, max_steps=-1"):
        fit(tmp_path, DKMCallback(bits=2), max_epochs=-1, max_steps=-1)


def test_a_constant_temperature_trains_under_max_steps(tmp_path):
    model, t = fit(tmp_path, DKMCallback(bits=2, temperature=1e-2, save_dir=str(tmp_path)),
                   max_epochs=-1, max_steps=3)
    assert t.global_step == 3
    assert torch.unique(model.body[0].weight).numel() <= 4


def test_one_soft_epoch_with_an_epoch_schedule_warns_that_tau_stays_at_start(tmp_path):
    cb = DKMCallback(bits=2, finalize=False,
                     temperature={"start": 1e-1, "end": 1e-3, "interval": "epoch"})
    with pytest.warns(UserWarning, match=r"one soft DKM epoch \(max_epochs=1.*stays at its start"):
        fit(tmp_path, cb, max_epochs=1)


# -- arguments ---------------------------------------------------------------------------------
def test_a_single_string_target_is_one_pattern(tmp_path):
    model, _ = fit(tmp_path, DKMCallback(bits=2, targets="body.0", finalize=False), max_epochs=1)
    assert set(clustered_tensors(model)) == {"body.0.weight"}


def test_exclude_patterns_that_match_nothing_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"exclude pattern 'decoder\.\*' matches no.*body\.0"):
        fit(tmp_path, DKMCallback(bits=2, exclude=["decoder.*"]))


def test_an_override_for_a_tensor_below_min_size_warns_that_it_is_not_applied(tmp_path):
    cb = DKMCallback(bits=2, overrides={"body.4": {"bits": 8}}, finalize=False)
    with pytest.warns(UserWarning, match=r"overrides\['body\.4'\] is not applied.*min_size=2048"):
        fit(tmp_path, cb, max_epochs=1)


def test_a_subclass_of_an_unsupported_strategy_is_refused():
    class MyStrategy(FSDPStrategy):
        pass

    fake_trainer = types.SimpleNamespace(strategy=MyStrategy.__new__(MyStrategy))
    with pytest.raises(MisconfigurationException, match=r"does not support MyStrategy.*FSDP2"):
        DKMCallback(bits=2).setup(fake_trainer, TinyNet(), "fit")


def test_tensor_parallelism_is_refused_with_the_setting_that_works():
    strategy = ModelParallelStrategy.__new__(ModelParallelStrategy)
    strategy._tensor_parallel_size = 2
    fake_trainer = types.SimpleNamespace(strategy=strategy, world_size=4)
    expected = r"tensor_parallel_size=2.*data_parallel_size=4, tensor_parallel_size=1"
    with pytest.raises(MisconfigurationException, match=expected):
        DKMCallback(bits=2).setup(fake_trainer, TinyNet(), "fit")


# -- tied weights --------------------------------------------------------------------------------


class ReadsBothOwners(pl.Callback):
    """After DKMCallback's batch start (the forward cache is open): both owners' weights."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.first = pl_module.body[2].weight
            self.second = pl_module.tied.weight
            self.raw = clustered_tensors(pl_module)["body.2.weight"].original.detach().clone()


def test_both_owners_of_a_tied_weight_read_one_clustered_tensor(tmp_path):
    spy = ReadsBothOwners()
    model, _ = fit(tmp_path, DKMCallback(bits=2, finalize=False), TiedNet(), max_epochs=1,
                   extra_callbacks=[spy])
    assert spy.second is spy.first  # one DKM result, cached for the forward
    assert not torch.equal(spy.second.detach(), spy.raw)  # clustered, not the raw Parameter
    assert set(clustered_tensors(model)) == {"body.0.weight", "body.2.weight"}


def test_the_tied_use_receives_gradient_through_the_clustered_tensor():
    model = TiedNet()
    attach(model, select_targets(model, ClusterSpec(bits=2)))
    original = clustered_tensors(model)["body.2.weight"].original
    model.train()
    model.tied(torch.randn(8, 64)).sum().backward()  # only the second owner is used
    assert original.grad is not None and bool(original.grad.abs().sum() > 0)


def test_finalize_keeps_a_tied_weight_tied_and_snapped(tmp_path):
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model, _ = fit(tmp_path, cb, TiedNet(), max_epochs=2)
    assert type(model.tied) is nn.Linear and not hasattr(model.tied, "parametrizations")
    assert model.tied.weight is model.body[2].weight
    assert torch.unique(model.tied.weight).numel() <= 4
    assert set(cb.palettes) == {"body.0.weight", "body.2.weight"}


# -- a second fit of the same model object ------------------------------------------------------
def test_a_finalized_model_fits_again_from_a_mid_dkm_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, _ = fit(tmp_path, DKMCallback(bits=2, save_dir=str(tmp_path / "a")),
                   enable_checkpointing=True, extra_callbacks=[checkpoint], max_epochs=2)
    assert type(model.body[0]) is nn.Linear  # finalized
    second = DKMCallback(bits=2, save_dir=str(tmp_path / "b"))
    t = trainer(tmp_path, callbacks=[second], max_epochs=3)
    t.fit(model, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t.current_epoch == 3
    assert torch.unique(model.body[0].weight).numel() <= 4
    assert second.report is not None


def test_resuming_with_another_selection_is_refused_naming_both(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, DKMCallback(bits=2, finalize=False), enable_checkpointing=True,
        extra_callbacks=[checkpoint], max_epochs=1)
    other = DKMCallback(bits=2, targets=["body.0"], finalize=False)
    t = trainer(tmp_path, callbacks=[other], max_epochs=2)
    with pytest.raises(MisconfigurationException, match=r"body\.2\.weight.*select \[.body\.0"):
        t.fit(TinyNet(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


# -- a fit again after a crashed fit, with the same Trainer --------------------------------------
class CrashOnce(TinyNet):
    """TinyNet whose training_step raises once at ``crash_at`` (mid-DKM), then trains."""

    crash_at: int | None = 5

    def training_step(self, batch, batch_idx):
        if self.crash_at is not None and self.global_step == self.crash_at:
            self.crash_at = None
            raise RuntimeError("crash mid-DKM")
        return super().training_step(batch, batch_idx)


class AtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = {n: (t.parametrization.layout.spec.bits, t.parametrization.centroids.clone())
                     for n, t in clustered_tensors(pl_module).items()}


def test_a_fit_after_a_crashed_fit_starts_from_a_clean_dkm_state(tmp_path):
    # Before: the crashed fit's parametrizations stayed on the model; the second fit's
    # allocation could not read the weights behind them (uniform widths, with a warning that
    # 'body.0.weight' is not a parameter), while the tensors kept the old widths and centroids.
    torch.manual_seed(0)
    model = CrashOnce()
    with torch.no_grad():
        model.body[2].weight.mul_(1e-3)  # the budget gives it fewer bits than body.0
    dkm = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"), verbose=False)
    spy = AtTrainStart()
    t = trainer(tmp_path, callbacks=[dkm, spy], max_epochs=2)
    with pytest.raises(RuntimeError, match="crash mid-DKM"):
        t.fit(model)
    crashed = {n: bits for n, (bits, _) in spy.seen.items()}
    assert crashed == dkm.bit_allocation.bits != {"body.0.weight": 2, "body.2.weight": 2}
    # what a fresh fit of a model with these weights (the originals as trained) starts from
    weights = {n: p.detach().clone() for n, p in model.named_parameters()
               if "parametrizations" not in n}
    weights.update({n: t.original.detach().clone()
                    for n, t in clustered_tensors(model).items()})
    fresh_model = TinyNet()
    fresh_model.load_state_dict(weights)
    fresh = DKMCallback(bits=2, save_dir=str(tmp_path / "f"), verbose=False)
    fresh_spy = AtTrainStart()
    torch.manual_seed(1)
    trainer(tmp_path / "f", callbacks=[fresh, fresh_spy], max_epochs=1).fit(fresh_model)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        t.fit(model)  # the same Trainer and callback, no ckpt_path
    assert not [w for w in seen if "not a parameter" in str(w.message)]
    assert dkm.bit_allocation.bits == fresh.bit_allocation.bits
    assert {n: bits for n, (bits, _) in spy.seen.items()} == fresh.bit_allocation.bits
    for name, (_, centroids) in spy.seen.items():
        assert torch.equal(centroids, fresh_spy.seen[name][1]), name
    assert {n: p.layout.spec.bits for n, p in dkm.palettes.items()} == dkm.bit_allocation.bits
