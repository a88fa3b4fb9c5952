"""Specification of the plain checkpoint format (lightning_dkm.model.checkpoint), on plain
PyTorch models: a clustered model's state splits into the plain model's state dict (strictly
loadable, weights snapped) and a DKM state that restores the clustered model exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from plain_models import TiedLinears
from torch import nn

from lightning_dkm import (
    ClusterSpec,
    attach,
    carried_palettes,
    clustered_tensors,
    finalize,
    join_dkm_state,
    select_targets,
    split_dkm_state,
)
from lightning_dkm.model.checkpoint import prepare_plain_load, restore_dkm_state


def plain_net() -> TiedLinears:
    torch.manual_seed(0)
    return TiedLinears()


def clustered_net(spec: ClusterSpec | None = None, initialize: bool = True) -> TiedLinears:
    model = plain_net()
    attach(model, select_targets(model, spec or ClusterSpec(bits=2), min_size=0),
           initialize=initialize)
    return model


def trained(model: TiedLinears) -> TiedLinears:
    """Moves the originals and the centroids away from their initial values."""
    with torch.no_grad():
        for tensor in clustered_tensors(model).values():
            tensor.original.add_(0.01 * torch.randn_like(tensor.original))
            tensor.parametrization.centroids.mul_(1.1)
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


# -- the plain state dict ----------------------------------------------------------------------
def test_the_plain_state_dict_loads_strictly_into_the_plain_model():
    plain, _ = split_dkm_state(trained(clustered_net()))
    plain_net().load_state_dict(plain)  # strict by default
    assert not any("parametrizations" in key or "_COREML_" in key for key in plain)


def test_each_clustered_weight_is_snapped_as_finalize_would_snap_it_now():
    model = trained(clustered_net())
    plain, _ = split_dkm_state(model)
    finalized = copy.deepcopy(model)
    finalize(finalized)
    for name in ("first.weight", "second.weight"):
        assert torch.equal(plain[name], finalized.get_parameter(name)), name
        assert torch.unique(plain[name]).numel() <= 4


def test_a_tied_weight_is_one_snapped_tensor_under_every_owner():
    plain, dkm_state = split_dkm_state(trained(clustered_net()))
    assert plain["tied.weight"] is plain["second.weight"]
    assert dkm_state["tensors"]["second.weight"]["keys"] == ["second.weight", "tied.weight"]
    model = plain_net()
    model.load_state_dict(plain)
    assert model.tied.weight is model.second.weight  # loading keeps the tie


def test_before_dkm_starts_the_plain_weights_are_the_weights_as_trained():
    model = clustered_net(initialize=False)  # centroids not seeded yet (before start_epoch)
    plain, _ = split_dkm_state(model)
    for name, tensor in clustered_tensors(model).items():
        assert torch.equal(plain[name], tensor.original.detach()), name


def test_the_dkm_state_holds_every_removed_entry_and_only_tensors_and_primitives(tmp_path):
    model = trained(clustered_net(ClusterSpec(bits=2, per_channel_scale=True)))
    state = model.state_dict()
    _, dkm_state = split_dkm_state(model)
    entries = {k for t in dkm_state["tensors"].values() for k in t["entries"]}
    assert entries == {k for k in state if "parametrizations" in k}
    assert "first.parametrizations.weight.0.scale" in entries
    torch.save(dkm_state, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=True)  # no pickled objects


def test_the_given_state_dict_is_not_modified():
    model = clustered_net()
    state = model.state_dict()
    keys = list(state)
    split_dkm_state(model, state)
    assert list(state) == keys


def test_names_limit_the_split_to_some_tensors():
    plain, dkm_state = split_dkm_state(clustered_net(), names=["first.weight"])
    assert set(dkm_state["tensors"]) == {"first.weight"}
    assert "first.weight" in plain and "second.parametrizations.weight.original" in plain


def test_a_state_dict_of_another_model_is_refused_naming_the_missing_key():
    with pytest.raises(ValueError, match=r"first\.weight.*first\.parametrizations\.weight"):
        split_dkm_state(clustered_net(), plain_net().state_dict())


# -- back into the clustered model -------------------------------------------------------------
def test_join_gives_the_state_dict_the_clustered_model_loads_strictly():
    model = trained(clustered_net())
    plain, dkm_state = split_dkm_state(model)
    fresh = clustered_net(initialize=False)
    fresh.load_state_dict(join_dkm_state(plain, dkm_state))
    assert_same_state(fresh, model)


def test_prepare_then_restore_is_exact_and_keeps_every_parameter_object():
    model = trained(clustered_net())
    plain, dkm_state = split_dkm_state(model)
    fresh = clustered_net(initialize=False)
    parameters = {name: id(p) for name, p in fresh.named_parameters()}
    incoming = dict(plain)
    waiting = prepare_plain_load(fresh, incoming)
    assert waiting.parametrized == ["first.weight", "second.weight"]
    fresh.load_state_dict(incoming)  # strict: the DKM entries are placeholders
    restore_dkm_state(fresh, dkm_state, waiting.parametrized)
    assert_same_state(fresh, model)
    # an optimizer built before the load still holds the trained Parameters
    assert {name: id(p) for name, p in fresh.named_parameters()} == parameters
    assert clustered_tensors(fresh)["second.weight"].parametrization.is_initialized


def test_a_state_dict_with_the_dkm_keys_is_left_for_the_model_to_load_as_it_is():
    model = clustered_net()
    state = model.state_dict()
    assert prepare_plain_load(clustered_net(), state) == ([], [])
    assert state.keys() == model.state_dict().keys()


def test_a_dkm_state_of_another_format_is_refused():
    plain, dkm_state = split_dkm_state(clustered_net())
    with pytest.raises(ValueError, match=r"format 1.*got format 0"):
        join_dkm_state(plain, {**dkm_state, "format": 0})


# -- finalized models --------------------------------------------------------------------------
def test_a_finalized_model_splits_into_plain_weights_and_its_carried_palettes():
    model = clustered_net()
    palettes = finalize(model)
    plain, dkm_state = split_dkm_state(model)
    plain_net().load_state_dict(plain)
    assert dkm_state["tensors"] == {}
    assert "first._COREML_/weight/lut" in dkm_state["carried"]
    again = plain_net()
    again.load_state_dict(plain)
    restore_dkm_state(again, dkm_state)
    for name, palette in carried_palettes(again).items():
        assert torch.equal(palette.lut, palettes[name].lut), name
    assert_same_state(again, model)


def test_a_mid_dkm_checkpoint_loaded_into_a_finalized_model_carries_that_checkpoints_palettes():
    mid = trained(clustered_net())
    plain, dkm_state = split_dkm_state(mid)
    expected = finalize(copy.deepcopy(mid))
    model = clustered_net()
    finalize(model)  # carries its own, older palettes
    incoming = dict(plain)
    waiting = prepare_plain_load(model, incoming)
    assert waiting.carried == ["first.weight", "second.weight"]
    model.load_state_dict(incoming)
    restore_dkm_state(model, dkm_state, waiting.carried)
    carried = carried_palettes(model)  # checks that LUT[indices] is the loaded weight
    for name, palette in expected.items():
        assert torch.equal(carried[name].lut, palette.lut), name
        assert torch.equal(carried[name].indices, palette.indices), name
