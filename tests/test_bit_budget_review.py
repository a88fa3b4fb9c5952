"""Corner cases of ``average_bits`` in a fit and in ``palettize`` (review of the per-tensor
width allocation): the sensitivity batch is the batch ``training_step`` sees, every tensor
fixed by overrides leaves nothing to call rounding noise, and a resume cannot bring widths an
export refuses past setup."""

from __future__ import annotations

import warnings

import pytest
import torch
from extras import need
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, random_classification, trainer
from torch.utils.data import DataLoader

from lightning_dkm import DKMCallback, palettize


class TransferHookNet(TinyNet):
    """Training batches of ``{"x": ..., "y": ...}`` that ``on_after_batch_transfer`` turns into
    the ``(x, y)`` its ``training_step`` reads (Lightning's batch hooks): a fit of it runs."""

    def train_dataloader(self):
        return DataLoader([{"x": x, "y": y} for x, y in random_classification()], batch_size=32)

    def val_dataloader(self):
        return DataLoader([{"x": x, "y": y} for x, y in random_classification(64, seed=1)],
                          batch_size=32)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch["x"], batch["y"]


def test_the_sensitivity_batch_goes_through_lightnings_batch_hooks_as_training_batches_do(
        tmp_path):
    callback = DKMCallback(bits=2, save_dir=str(tmp_path), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(TransferHookNet())
    # the Hessian of training_step on the hooked batch, cut to its first 8 samples
    assert callback.bit_allocation.sensitivity == "hessian (1 batch, the first 8 samples of each)"


EVERY_TARGET_FIXED = {"body.0": {"bits": 2}, "body.2": {"bits": 3}}


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def rounding_noise_warnings(seen):
    return [w for w in seen if "rounding noise" in str(w.message)]


def test_with_every_tensor_fixed_by_overrides_palettize_calls_nothing_rounding_noise():
    data = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)),
             torch.arange(16) % 4)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        palettes = palettize(TinyNet(), average_bits=3, overrides=EVERY_TARGET_FIXED,
                             calibration=(data, loss_of), n_init=1)
    assert {n: p.layout.spec.bits for n, p in palettes.items()} == {
        "body.0.weight": 2, "body.2.weight": 3}
    assert not rounding_noise_warnings(seen)


def test_with_every_tensor_fixed_by_overrides_a_fit_calls_nothing_rounding_noise(tmp_path):
    callback = DKMCallback(bits=2, overrides=EVERY_TARGET_FIXED, save_dir=str(tmp_path),
                           verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(TinyNet())
    allocation = callback.bit_allocation
    assert allocation.bits == {"body.0.weight": 2, "body.2.weight": 3}
    assert all(t.fixed for t in allocation.tensors)
    assert not rounding_noise_warnings(seen)
    assert "noise" not in allocation.sensitivity


class CountsSteps(TinyNet):
    steps = 0  # batches the training loop started (not the allocation's call at setup)

    def on_train_batch_start(self, batch, batch_idx):
        type(self).steps += 1


def test_a_resume_at_widths_core_ai_cannot_pack_fails_before_training_not_after(tmp_path):
    """A checkpoint of uniform 3 bits (average_bits=None) resumed with export_coreai=True: the
    resume keeps the checkpoint's widths, which Core AI cannot pack, so the fit must refuse
    them when it loads the checkpoint, not export them after training."""
    need("coreai_torch")  # export_coreai=True is refused first without the coreai extra
    first = DKMCallback(bits=3, average_bits=None, save_dir=str(tmp_path / "a"), verbose=False,
                        finalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer(tmp_path / "a", callbacks=[first], max_epochs=1,
                enable_checkpointing=True).fit(TinyNet())
    checkpoint = next((tmp_path / "a").rglob("*.ckpt"))

    model = CountsSteps()
    model.example_input_array = torch.randn(2, 32)
    CountsSteps.steps = 0
    resumed = DKMCallback(bits=3, export_coreai=True, save_dir=str(tmp_path / "b"),
                          verbose=False)
    with warnings.catch_warnings(), pytest.raises(MisconfigurationException,
                                                  match=r"checkpoint.*body\.0\.weight \(3 "
                                                        r"bits\)"):
        warnings.simplefilter("ignore")
        trainer(tmp_path / "b", callbacks=[resumed], max_epochs=2).fit(model,
                                                                       ckpt_path=checkpoint)
    assert CountsSteps.steps == 0
