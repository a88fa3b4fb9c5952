"""Checkpoints, resume and the fit's outputs, in cases the other suites leave out: two
callbacks on disjoint targets reading back a mid-DKM checkpoint, and what a callback reports
after a later fit of its own."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyNet, trainer

from lightning_dkm import DKMCallback, clustered_tensors


def two_callbacks() -> list[DKMCallback]:
    return [DKMCallback(bits=2, targets=["body.0"], finalize=False, average_bits=None),
            DKMCallback(bits=3, targets=["body.2"], finalize=False, average_bits=None)]


@pytest.fixture
def mid_dkm_checkpoint_of_two_callbacks(tmp_path):
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    t = trainer(tmp_path, callbacks=[*two_callbacks(), checkpoints], max_epochs=1,
                enable_checkpointing=True)
    t.fit(TinyNet())
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    return path, torch.load(path, weights_only=True)


def entries_of(checkpoint, name):
    (entries,) = [state["model"]["tensors"][name]["entries"]
                  for key, state in checkpoint["callbacks"].items()
                  if key.startswith("DKMCallback") and name in state["model"]["tensors"]]
    return entries


def assert_restored(model, checkpoint):
    for name, tensor in clustered_tensors(model).items():
        prefix = f"{name.rsplit('.', 1)[0]}.parametrizations.weight."
        entries = entries_of(checkpoint, name)
        assert torch.equal(tensor.original.detach(), entries[prefix + "original"]), name
        assert torch.equal(tensor.parametrization.centroids, entries[prefix + "0.centroids"]), name


def test_two_callbacks_on_disjoint_targets_resume_a_mid_dkm_checkpoint(
        tmp_path, mid_dkm_checkpoint_of_two_callbacks):
    path, checkpoint = mid_dkm_checkpoint_of_two_callbacks
    model = TinyNet()
    t = trainer(tmp_path / "resumed", callbacks=two_callbacks(), max_epochs=1)
    t.fit(model, ckpt_path=str(path))  # max_epochs reached at once: only the restore runs
    assert set(clustered_tensors(model)) == {"body.0.weight", "body.2.weight"}
    assert_restored(model, checkpoint)


def test_two_callbacks_on_disjoint_targets_test_from_a_mid_dkm_checkpoint(
        tmp_path, mid_dkm_checkpoint_of_two_callbacks):
    path, checkpoint = mid_dkm_checkpoint_of_two_callbacks
    model = TinyNet()
    t = trainer(tmp_path / "again", callbacks=two_callbacks(), max_epochs=1)
    t.fit(model)  # a clustered model whose state differs from the checkpoint's
    t.test(model, ckpt_path=str(path), verbose=False)
    assert_restored(model, checkpoint)


def test_a_later_fit_that_clusters_nothing_does_not_report_the_earlier_fits_outputs(tmp_path):
    dkm = DKMCallback(bits=2, start_epoch=1, save_dir=str(tmp_path / "dkm"), verbose=False)
    trainer(tmp_path, callbacks=[dkm], max_epochs=2).fit(TinyNet())
    assert dkm.report is not None and dkm.artifact_path is not None
    model = TinyNet()
    with pytest.warns(UserWarning, match="before DKM started"):
        trainer(tmp_path, callbacks=[dkm], max_epochs=1).fit(model)  # ends before start_epoch
    assert not clustered_tensors(model)
    # nothing was written or finalized in this fit: no result of the earlier one stands for it
    assert dkm.report is None
    assert dkm.output_paths == {} and dkm.artifact_path is None
    assert dkm.palettes == {} and dkm.stats == {}
    assert dkm.finalized_model is None


@pytest.mark.parametrize("now", [dict(average_bits=3.0), dict(bits=3, average_bits=None)])
def test_a_resume_under_other_keyed_settings_names_the_key_its_state_is_under(tmp_path, now):
    # The state key holds bits, cluster_dim, group_size, per_channel_scale, targets, exclude and
    # a numeric average_bits: the same tensors' state under another key was refused as "the
    # checkpoint clusters [a, b], but this run's targets select [a, b]".
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    written = DKMCallback(average_bits=2.5, finalize=False)
    trainer(tmp_path, callbacks=[written, checkpoints], max_epochs=1,
            enable_checkpointing=True).fit(TinyNet())
    resumed = DKMCallback(finalize=False, **now)
    t = trainer(tmp_path / "resumed", callbacks=[resumed], max_epochs=2)
    with pytest.raises(Exception, match=r"(?s)stored under DKMCallback\{.*'average_bits': 2\.5"
                                        r".*this callback's key is DKMCallback\{") as raised:
        t.fit(TinyNet(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert "but this run's targets select" not in str(raised.value)
