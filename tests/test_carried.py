"""Specification of the palettes a finalized model carries (lightning_dkm.model.carried):
coremltools'
compression-metadata buffers, written by finalize / palettize / load_compressed, read back
exactly, kept true through checkpoints, and never silently stale."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyNet, trainer
from plain_models import EveryLayer
from safetensors import safe_open
from torch import nn

from lightning_dkm import (
    ClusterSpec,
    DKMCallback,
    attach,
    carried_palettes,
    carry_palettes,
    discard_palettes,
    expect_carried_buffers,
    finalize,
    load_compressed,
    palettize,
    save_compressed,
    select_targets,
)
from lightning_dkm.export.artifact import read_metadata, read_palettes


def every_layout(model: nn.Module):
    return palettize(
        model, bits=2, min_size=256, n_init=1, max_iter=10,
        overrides={"conv": {"cluster_dim": 2}, "fc": {"group_size": 8},
                   "deconv": {"per_channel_scale": True, "group_size": 4}},
    )


def assert_same_palettes(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].layout == b[name].layout, name
        assert torch.equal(a[name].lut, b[name].lut), name
        assert torch.equal(a[name].indices, b[name].indices), name
        assert (a[name].scale is None) == (b[name].scale is None), name
        if a[name].scale is not None:
            assert torch.equal(a[name].scale, b[name].scale), name


def test_palettize_records_coremltools_metadata_buffers_on_each_owner() -> None:
    model = EveryLayer()
    every_layout(model)
    state = model.state_dict()
    assert torch.equal(state["_COREML_/metadata_version"], torch.tensor(1))
    assert state["fc._COREML_/weight/lut"].shape == (4, 1, 4, 1)  # 4 palettes of 8 channels
    assert state["conv._COREML_/weight/lut"].shape == (1, 1, 1, 1, 4, 2)  # 2-vectors
    assert int(state["conv._COREML_/weight/vector_axis"]) == 1
    assert state["deconv._COREML_/weight/lut"].shape == (1, 2, 1, 1, 4, 1)  # channels on dim 1
    assert state["deconv._COREML_/weight/palettization_scale"].shape == (1, 8, 1, 1)
    assert int(state["deconv._COREML_/weight/vector_axis"]) == 0
    assert state["embed._COREML_/weight/compression_type"].tolist() == [2]


def test_the_carried_palettes_are_the_palettes_of_every_layout() -> None:
    model = EveryLayer()
    palettes = every_layout(model)
    assert_same_palettes(carried_palettes(model), palettes)


def test_a_palette_is_carried_only_by_a_tensor_of_its_name_and_shape() -> None:
    palettes = every_layout(EveryLayer())
    other = EveryLayer()
    other.fc = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"palette 'fc\.weight' is for shape \(32, 64\), but "
                                         r"the model's 'fc\.weight' has shape \(8, 16\)"):
        carry_palettes(other, {"fc.weight": palettes["fc.weight"]})
    with pytest.raises(ValueError, match=r"palette 'fc\.nothing' has no tensor of that name"):
        carry_palettes(other, {"fc.nothing": palettes["fc.weight"]})
    assert not carried_palettes(other)  # nothing recorded


def test_finalize_records_them_too() -> None:
    model = EveryLayer()
    targets = select_targets(model, ClusterSpec(bits=2, group_size=4), min_size=256,
                             targets=["fc", "deconv"])
    attach(model, targets)
    palettes = finalize(model)
    assert_same_palettes(carried_palettes(model), palettes)


def test_save_compressed_needs_nothing_but_the_model(tmp_path) -> None:
    model = EveryLayer()
    palettes = every_layout(model)
    path = save_compressed(model, tmp_path / "m.safetensors")
    assert_same_palettes(read_palettes(path), {
        n: type(p)(p.lut.half(), p.indices, p.layout,
                   None if p.scale is None else p.scale.half())
        for n, p in palettes.items()
    })
    with safe_open(str(path), framework="pt") as f:  # the artifact stores palettes its own way
        assert not any("_COREML_" in key for key in f.keys())  # noqa: SIM118


def test_a_weight_changed_after_finalize_is_an_error_naming_it(tmp_path) -> None:
    model = EveryLayer()
    every_layout(model)
    with torch.no_grad():
        model.fc.weight[3, 5] += 0.5
    with pytest.raises(ValueError, match=r"fc\.weight: the weight no longer matches the palette"):
        save_compressed(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    discard_palettes(model, ["fc.weight"])  # storing it dense is then a choice
    assert "fc.weight" not in carried_palettes(model)


def test_a_loaded_model_carries_what_it_loaded(tmp_path) -> None:
    model = EveryLayer()
    every_layout(model)
    path = save_compressed(model, tmp_path / "m.safetensors", lut_dtype=torch.float32)
    fresh = EveryLayer()
    loaded = load_compressed(fresh, path)
    assert_same_palettes(carried_palettes(fresh), loaded)
    again = save_compressed(fresh, tmp_path / "again.safetensors", lut_dtype=torch.float32)
    digest = "lightning_dkm.sha256"  # over every tensor and entry, in sorted order
    assert read_metadata(again)[digest] == read_metadata(path)[digest]


def test_the_buffers_survive_a_state_dict_round_trip_and_a_move() -> None:
    model = EveryLayer()
    palettes = every_layout(model)
    fresh = EveryLayer()
    expect_carried_buffers(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())  # strict
    assert_same_palettes(carried_palettes(fresh.to(torch.float64).to(torch.float32)), palettes)


def test_clustering_a_finalized_model_again_drops_its_stale_palettes() -> None:
    model = EveryLayer()
    every_layout(model)
    attach(model, select_targets(model, ClusterSpec(bits=3), min_size=256, targets=["fc"]))
    assert not any(k.startswith("fc._COREML_") for k in model.state_dict())
    assert "embed._COREML_/weight/lut" in model.state_dict()  # the others stay
    palettes = finalize(model)
    assert carried_palettes(model)["fc.weight"].layout.spec.bits == 3
    assert torch.equal(carried_palettes(model)["fc.weight"].indices, palettes["fc.weight"].indices)


def test_test_from_the_best_checkpoint_keeps_the_carried_palettes_true(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"))
    model = TinyNet()
    t = trainer(tmp_path, callbacks=[cb, checkpoint], enable_checkpointing=True, max_epochs=3)
    t.fit(model)
    t.test(model, ckpt_path="best", verbose=False)  # a mid-DKM checkpoint, snapped on load
    carried = carried_palettes(model)  # consistent with the best checkpoint's weights
    assert set(carried) == {"body.0.weight", "body.2.weight"}
    for name, palette in carried.items():
        assert torch.equal(palette.weight(), model.get_parameter(name))


def test_a_compiled_wrapper_saves_under_the_model_s_own_names(tmp_path) -> None:
    model = EveryLayer()
    palettes = every_layout(model)
    compiled = torch.compile(model)  # not run: only the wrapper's names matter here
    path = save_compressed(compiled, tmp_path / "m.safetensors", lut_dtype=torch.float32)
    assert set(read_palettes(path)) == set(palettes)
    assert_same_palettes(carried_palettes(compiled), palettes)
