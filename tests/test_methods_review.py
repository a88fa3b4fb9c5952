"""Review of target selection: tied weights, overrides and models on the meta device."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_dkm.engine.layout import ClusterSpec
from lightning_dkm.model.targets import select_targets


class _TiedHead(nn.Module):
    """An embedding whose weight the output head shares, and an untied layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight
        self.fc = nn.Linear(32, 64)


def test_layers_built_on_the_meta_device_are_not_taken_for_tied_weights() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    selected = select_targets(model, ClusterSpec(bits=2), min_size=0)
    assert [t.name for t in selected] == ["0.weight", "1.weight", "2.weight"]
    assert all(t.tied == () for t in selected)


def test_tied_weights_on_the_meta_device_are_still_one_target() -> None:
    with torch.device("meta"):
        model = _TiedHead()
    selected = select_targets(model, ClusterSpec(bits=2), min_size=0)
    assert [(t.name, t.tied) for t in selected] == [
        ("emb.weight", (("head", "weight"),)), ("fc.weight", ())]


def test_an_override_naming_a_further_owner_of_a_tied_weight_applies_to_that_weight() -> None:
    selected = select_targets(_TiedHead(), ClusterSpec(bits=4), min_size=0,
                              overrides={"head": {"bits": 8}})
    by_name = {t.name: t for t in selected}
    assert by_name["emb.weight"].tied == (("head", "weight"),)
    assert by_name["emb.weight"].spec.bits == 8
    assert by_name["emb.weight"].override == "head"
    assert by_name["fc.weight"].spec.bits == 4


def test_conflicting_overrides_of_the_owners_of_one_tied_weight_are_refused() -> None:
    with pytest.raises(ValueError, match=r"emb.weight.*head"):
        select_targets(_TiedHead(), ClusterSpec(bits=4), min_size=0,
                       overrides={"emb": {"bits": 2}, "head": {"bits": 8}})


def test_an_override_of_an_excluded_tensor_is_not_applied_silently() -> None:
    with pytest.warns(UserWarning, match=r"overrides\['fc'\] is not applied"):
        selected = select_targets(_TiedHead(), ClusterSpec(bits=4), min_size=0,
                                  exclude=["fc"], overrides={"fc": {"bits": 8}})
    assert [t.name for t in selected] == ["emb.weight"]


def test_an_override_outside_targets_is_not_applied_silently() -> None:
    with pytest.warns(UserWarning, match=r"overrides\['fc'\] is not applied"):
        select_targets(_TiedHead(), ClusterSpec(bits=4), min_size=0,
                       targets=["emb"], overrides={"fc": {"bits": 8}})


def test_an_applied_override_gives_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selected = select_targets(_TiedHead(), ClusterSpec(bits=4), min_size=0,
                                  overrides={"fc": {"bits": 8}})
    assert {t.name: t.spec.bits for t in selected} == {"emb.weight": 4, "fc.weight": 8}
