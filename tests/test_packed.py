"""Specification of packed inference: the clustered weights stay LUT + bit-packed indices, the
model holds about the artifact's bytes, and its outputs equal the dense model's."""

from __future__ import annotations

import copy

import pytest
import torch
from plain_models import EveryLayer1d
from torch import nn

from lightning_dkm import CompressionReport, palettize, save_compressed
from lightning_dkm.export.artifact import load_compressed
from lightning_dkm.export.packed import is_packed, pack, packed_palettes, unpack


def finalized() -> tuple[EveryLayer1d, dict]:
    torch.manual_seed(0)
    model = EveryLayer1d().eval()
    palettes = palettize(
        model, bits=2, min_size=256, n_init=1, max_iter=10,
        overrides={"conv": {"cluster_dim": 2}, "fc": {"group_size": 8},
                   "deconv": {"per_channel_scale": True}},
    )
    return model, palettes


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def test_a_packed_model_gives_the_dense_outputs_bit_for_bit() -> None:
    model, _ = finalized()
    dense = model(tokens())
    pack(model)
    assert is_packed(model)
    assert torch.equal(model(tokens()), dense)
    assert not hasattr(model.fc, "weight")  # the dense weight exists only during forward


def test_a_packed_model_holds_about_the_artifact_bytes() -> None:
    model, palettes = finalized()
    report = CompressionReport.build(model, palettes, lut_dtype=torch.float32)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    pack(model)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held == report.total_bytes  # fp32 LUTs + packed indices + the dense rest
    assert held < dense_bytes / 4
    # only the unclustered tensors stay Parameters
    assert {n for n, _ in model.named_parameters()} == {"conv.bias", "deconv.bias", "fc.bias"}


def test_load_compressed_packed_never_decodes_into_the_model(tmp_path) -> None:
    model, _ = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", lut_dtype=torch.float32)
    fresh = EveryLayer1d().eval()
    loaded = load_compressed(fresh, path, packed=True)
    assert is_packed(fresh)
    assert torch.equal(fresh(tokens()), model(tokens()))
    for name, palette in packed_palettes(fresh).items():
        assert torch.equal(palette.indices, loaded[name].indices)


def test_unpack_restores_the_dense_finalized_model() -> None:
    model, palettes = finalized()
    reference = copy.deepcopy(model)
    unpack(pack(model))
    assert not is_packed(model)
    for name in palettes:
        assert isinstance(model.get_parameter(name), nn.Parameter)
        assert torch.equal(model.get_parameter(name), reference.get_parameter(name))
    assert torch.equal(model(tokens()), reference(tokens()))


def test_a_stale_palette_or_a_tied_weight_is_not_packed() -> None:
    model, palettes = finalized()
    with torch.no_grad():
        model.fc.weight[0, 0] += 1
    with pytest.raises(ValueError, match=r"fc\.weight: the weight no longer matches the palette "
                       r"\(1 of \d+ elements differ\).*Nothing was packed"):
        pack(model, palettes)
    tied = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    tied[1].weight = tied[0].weight
    palettize(tied, bits=2, min_size=1)
    with pytest.raises(ValueError, match="tied"):
        pack(tied)


@pytest.mark.parametrize("packed", [False, True])
def test_a_model_built_on_the_meta_device_loads_without_its_own_initialisation(
        tmp_path, packed) -> None:
    model, _ = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", lut_dtype=torch.float32)
    with torch.device("meta"):
        fresh = EveryLayer1d().eval()
    load_compressed(fresh, path, packed=packed)
    assert not any(t.is_meta for t in fresh.state_dict().values())
    assert is_packed(fresh) is packed
    assert torch.equal(fresh(tokens()), model(tokens()))


def test_a_packed_model_follows_its_lut_when_it_is_loaded_cast_or_edited() -> None:
    model, palettes = finalized()
    pack(model)
    model(tokens())  # builds the decode tables
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.embed.weight_lut.mul_(2.0)  # an in-place edit
    assert torch.equal(model.embed(torch.tensor([[3]]))[0, 0],
                       2.0 * palettes["embed.weight"].weight()[3])
    model.load_state_dict(state)  # and back
    assert torch.equal(model.embed(torch.tensor([[3]]))[0, 0], palettes["embed.weight"].weight()[3])
    assert model.double()(tokens()).dtype == torch.float64  # a cast
