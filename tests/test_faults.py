"""Faults during a DKM fit: a crash in any hook leaves no forward cache open and a last
checkpoint that loads with ``weights_only`` and resumes to a finalized model; a failing write at
fit end loses nothing that cannot be written again."""

from __future__ import annotations

import errno
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyNet, trainer
from torch import nn
from torch.nn.utils import parametrize

from lightning_dkm import DKMCallback, load_compressed, save_compressed
from lightning_dkm.engine.parametrization import DKMParametrization

HOOKS = [
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_epoch_end",
    "on_train_epoch_end",
]


class CrashIn(pl.Callback):
    """Raises in ``hook`` during epoch 1 (a checkpoint of epoch 0 exists by then)."""

    def __init__(self, hook: str) -> None:
        def crash(trainer, pl_module, *args, **kwargs) -> None:
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                raise RuntimeError(f"deliberate crash in {hook}")

        setattr(self, hook, crash)


def fit(tmp_path, *callbacks, ckpt_path=None, max_epochs=3):
    torch.manual_seed(0)
    model = TinyNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    dkm = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    t = trainer(tmp_path, max_epochs=max_epochs, enable_checkpointing=True,
                callbacks=[dkm, checkpoint, *callbacks])
    t.fit(model, ckpt_path=ckpt_path)
    return model, dkm


def assert_resumes_to_a_finalized_model(tmp_path) -> None:
    last = tmp_path / "ckpt" / "last.ckpt"
    torch.load(last, weights_only=True)  # loadable without pickle
    model, dkm = fit(tmp_path, ckpt_path=str(last))
    assert type(model.body[0]) is nn.Linear
    assert torch.unique(model.body[0].weight).numel() <= 4
    assert dkm.artifact_path is not None and dkm.artifact_path.is_file()


@pytest.mark.parametrize("hook", HOOKS)
def test_a_crash_in_any_hook_leaves_a_resumable_checkpoint_and_no_open_cache(tmp_path, hook):
    with pytest.raises(RuntimeError, match=f"deliberate crash in {hook}"):
        fit(tmp_path, CrashIn(hook))
    assert parametrize._cache_enabled == 0
    assert_resumes_to_a_finalized_model(tmp_path)


def test_a_crash_inside_the_dkm_step_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """No public input makes the DKM step itself raise partway through a fit, so the fault is
    injected by wrapping ``DKMParametrization.forward``, the step that
    ``torch.nn.utils.parametrize`` calls on every read of a clustered weight."""
    calls = {"n": 0}
    forward = DKMParametrization.forward

    def failing_forward(self, weight):
        if self.training and self.mode == "soft":
            calls["n"] += 1
            if calls["n"] == 13:  # epoch 1 (4 steps an epoch, 2 tensors a step)
                raise RuntimeError("deliberate crash in the DKM step")
        return forward(self, weight)

    monkeypatch.setattr(DKMParametrization, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="deliberate crash in the DKM step"):
        fit(tmp_path)
    monkeypatch.setattr(DKMParametrization, "forward", forward)
    assert parametrize._cache_enabled == 0
    assert_resumes_to_a_finalized_model(tmp_path)


def test_a_failing_artifact_write_keeps_the_finalized_model_and_its_palettes(
    tmp_path, monkeypatch
):
    """The disk fills when fit's outputs are written: from the end of training on, every
    ``os.fsync`` fails with ENOSPC (the fault enters where a full disk shows, at the OS
    boundary, not through the library's own functions)."""
    disk_full = False
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    class DiskFillsAtTrainEnd(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:  # before DKMCallback's on_fit_end
            nonlocal disk_full
            disk_full = True

    monkeypatch.setattr(os, "fsync", fsync)
    torch.manual_seed(0)
    model = TinyNet()
    dkm = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path, max_epochs=2, callbacks=[dkm, DiskFillsAtTrainEnd()]).fit(model)
    assert not (tmp_path / "dkm" / "model.dkm.safetensors").exists()  # nothing half-written
    disk_full = False
    # the model is finalized and the palettes are kept: the artifact can be written again
    assert type(model.body[0]) is nn.Linear
    path = save_compressed(model, tmp_path / "again.dkm.safetensors", dkm.palettes)
    fresh = TinyNet()
    load_compressed(fresh, path)
    assert torch.unique(fresh.body[0].weight).numel() <= 4
