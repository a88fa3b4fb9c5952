"""Lightning checkpoints written with DKMCallback load anywhere: their state_dict is the plain
model's, whatever the phase (mid-DKM, after finalize, tied weights, several callbacks), and the
DKM state under the callback's key brings back what the model had, in fit and in test."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TiedNet, TinyNet, trainer

from lightning_dkm import DKMCallback, carried_palettes, clustered_tensors


def fit(tmp_path, *callbacks, model=None, max_epochs=2, **kwargs):
    torch.manual_seed(0)
    model = model or TinyNet()
    t = trainer(tmp_path, callbacks=list(callbacks), max_epochs=max_epochs,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                **kwargs)
    t.fit(model)
    return model, t


def every_epoch(tmp_path, **kwargs) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}", **kwargs)




# -- the state_dict is the plain model's ----------------------------------------------------------
def test_a_checkpoint_written_after_finalize_loads_into_a_plain_model(tmp_path):
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model, t = fit(tmp_path, cb)
    t.save_checkpoint(tmp_path / "final.ckpt")
    checkpoint = torch.load(tmp_path / "final.ckpt", weights_only=True)
    plain = TinyNet()
    plain.load_state_dict(checkpoint["state_dict"])  # strict: no _COREML_ buffers in it
    for name, value in model.state_dict().items():
        if "_COREML_" not in name:
            assert torch.equal(plain.state_dict()[name], value), name
    carried = checkpoint["callbacks"][cb.state_key]["model"]["carried"]
    assert "body.0._COREML_/weight/lut" in carried


def test_a_tied_weight_is_saved_under_both_owners_and_stays_tied_in_the_plain_model(tmp_path):
    fit(tmp_path, DKMCallback(bits=2, finalize=False), every_epoch(tmp_path), model=TiedNet(),
        max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert torch.equal(state["tied.weight"], state["body.2.weight"])
    assert torch.unique(state["tied.weight"]).numel() <= 4
    plain = TiedNet()
    plain.load_state_dict(state)
    assert plain.tied.weight is plain.body[2].weight


def test_each_of_two_callbacks_keeps_its_own_tensors_and_the_checkpoint_stays_plain(tmp_path):
    first = DKMCallback(bits=2, targets=["body.0"], finalize=False)
    second = DKMCallback(bits=3, targets=["body.2"], finalize=False)
    fit(tmp_path, first, second, every_epoch(tmp_path), max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    TinyNet().load_state_dict(checkpoint["state_dict"])
    states = checkpoint["callbacks"]
    assert set(states[first.state_key]["model"]["tensors"]) == {"body.0.weight"}
    assert set(states[second.state_key]["model"]["tensors"]) == {"body.2.weight"}


# -- and loads back into the model as it is -----------------------------------------------------
def test_testing_a_clustered_model_from_an_earlier_checkpoint_restores_its_originals(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    model, t = fit(tmp_path, cb, every_epoch(tmp_path))
    t.test(model, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"), verbose=False)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    dkm_state = checkpoint["callbacks"][cb.state_key]["model"]["tensors"]
    for name, tensor in clustered_tensors(model).items():
        module = name.rsplit(".", 1)[0]
        entries = dkm_state[name]["entries"]
        assert torch.equal(tensor.original.detach(),
                           entries[f"{module}.parametrizations.weight.original"]), name
        assert torch.equal(tensor.parametrization.centroids,
                           entries[f"{module}.parametrizations.weight.0.centroids"]), name


def test_testing_a_finalized_model_from_its_final_checkpoint_restores_its_palettes(tmp_path):
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model, t = fit(tmp_path, cb)
    t.save_checkpoint(tmp_path / "final.ckpt")
    t.test(model, ckpt_path=str(tmp_path / "final.ckpt"), verbose=False)
    carried = carried_palettes(model)
    assert set(carried) == set(cb.palettes)
    for name, palette in cb.palettes.items():
        assert torch.equal(carried[name].lut, palette.lut), name
        assert torch.equal(carried[name].indices, palette.indices), name


def test_two_callbacks_each_restore_their_palettes_into_a_finalized_model(tmp_path):
    first = DKMCallback(bits=2, targets=["body.0"], save_dir=str(tmp_path / "a"))
    second = DKMCallback(bits=3, targets=["body.2"], save_dir=str(tmp_path / "b"))
    model, t = fit(tmp_path, first, second)
    t.save_checkpoint(tmp_path / "final.ckpt")
    TinyNet().load_state_dict(torch.load(tmp_path / "final.ckpt", weights_only=True)["state_dict"])
    t.test(model, ckpt_path=str(tmp_path / "final.ckpt"), verbose=False)
    carried = carried_palettes(model)
    assert set(carried) == {"body.0.weight", "body.2.weight"}
    assert torch.equal(carried["body.0.weight"].lut, first.palettes["body.0.weight"].lut)
    assert torch.equal(carried["body.2.weight"].lut, second.palettes["body.2.weight"].lut)


def test_a_checkpoint_without_dkm_state_is_refused_before_testing_placeholders(tmp_path):
    cb = DKMCallback(bits=2, finalize=False)
    model, t = fit(tmp_path, cb, every_epoch(tmp_path), max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    del checkpoint["callbacks"]  # plain weights, no callback state: as written weights-only
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    with pytest.raises(MisconfigurationException,
                       match=r"plain weights for \['body\.0\.weight', 'body\.2\.weight'\] but no "
                             r"DKM state"):
        t.test(model, ckpt_path=str(tmp_path / "stripped.ckpt"), verbose=False)


def test_resuming_from_a_checkpoint_written_without_dkm_names_the_fix(tmp_path):
    fit(tmp_path, every_epoch(tmp_path), max_epochs=1)  # plain training, no DKMCallback
    t = trainer(tmp_path, callbacks=[DKMCallback(bits=2, finalize=False)], max_epochs=2)
    with pytest.raises(MisconfigurationException,
                       match=r"written without DKM: load its weights into the model before fit"):
        t.fit(TinyNet(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))


def test_a_weights_only_checkpoint_keeps_the_dkm_keys_and_a_finalized_model_loads_it_snapped(
    tmp_path,
):
    """Lightning writes weights-only checkpoints without calling any callback hook."""
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model, t = fit(tmp_path, cb, every_epoch(tmp_path, save_weights_only=True))
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    assert "body.0.parametrizations.weight.original" in state
    t.test(model, ckpt_path=str(path), verbose=False)
    assert torch.unique(model.body[0].weight).numel() <= 4
    carried_palettes(model)  # the palettes it carries describe the loaded weights


# -- under DDP ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_ddp_spawn_checkpoint_is_plain_and_resumes_in_one_process(tmp_path):
    """Every rank runs on_save_checkpoint (the same snapped weights: identical centroids); rank
    0 writes the file, which loads into a plain model and resumes without DDP."""
    from lightning.pytorch.strategies import DDPStrategy

    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, DKMCallback(bits=2, finalize=False), last, max_epochs=1, devices=2,
        strategy=DDPStrategy(start_method="spawn"))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    TinyNet().load_state_dict(checkpoint["state_dict"])
    cb = DKMCallback(bits=2, finalize=False)
    model = TinyNet()
    trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model, ckpt_path=str(
        tmp_path / "ckpt" / "last.ckpt"))  # already at max_epochs: restores, trains nothing
    entries = {k: v for t in checkpoint["callbacks"][cb.state_key]["model"]["tensors"].values()
               for k, v in t["entries"].items()}
    for key, value in entries.items():
        assert torch.equal(model.state_dict()[key], value), key
