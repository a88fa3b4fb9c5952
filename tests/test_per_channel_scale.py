"""Specification of per-channel scales (``per_channel_scale=True``): each output channel is
clustered divided by its largest ``|weight|``, and the scales travel with the palette through
DKM, palettize, finalize, the artifact, the report and checkpoints."""

from __future__ import annotations

import copy
import os
import struct

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyNet, trainer
from plain_models import EveryLayer, with_channel_magnitudes
from safetensors import safe_open
from torch import nn

from lightning_dkm import (
    ClusterSpec,
    CompressionReport,
    DKMCallback,
    DKMParametrization,
    PaletteLayout,
    attach,
    finalize,
    load_compressed,
    palettize,
    read_palettes,
    save_compressed,
    select_targets,
)
from lightning_dkm.engine.layout import channel_scale
from lightning_dkm.engine.palette import Palette


def scaled_palettes(model: nn.Module, **overrides) -> dict[str, Palette]:
    return palettize(
        model, bits=2, min_size=256, n_init=1, max_iter=20, per_channel_scale=True,
        overrides={"conv": {"cluster_dim": 2}, "fc": {"group_size": 8}, **overrides},
    )


def per_channel_distinct(weight: torch.Tensor, scale: torch.Tensor, axis: int) -> int:
    """The most distinct values of ``weight / scale`` over all channels of ``axis``."""
    shape = [1] * weight.dim()
    shape[axis] = -1
    unscaled = (weight / scale.view(shape)).movedim(axis, 0).reshape(weight.shape[axis], -1)
    return max(torch.unique(row).numel() for row in unscaled)


# -- the scales ---------------------------------------------------------------------------------
def test_a_channel_scale_is_its_largest_magnitude_rounded_to_float16() -> None:
    weight = torch.tensor([[0.1, -0.3, 0.2], [0.0, 0.0, 0.0], [2.0, 1.0, -70000.0]])
    scale = channel_scale(weight, axis=0)
    assert scale.dtype == torch.float32
    assert scale[0] == torch.tensor(0.3).half().float()  # float16-exact, so stored exactly
    assert scale[1] == 1.0  # an all-zero channel: nothing to scale
    assert scale[2] == 70000.0  # beyond float16's range: kept in float32


def test_scaled_palettes_map_back_to_the_weight() -> None:
    layout = PaletteLayout((6, 8), ClusterSpec(bits=2, per_channel_scale=True))
    weight = torch.randn(6, 8) * torch.logspace(-2, 1, 6)[:, None]
    scale = layout.channel_scale(weight)
    x = layout.to_palettes(weight, scale)
    assert x.abs().max() <= 1.001
    assert torch.allclose(layout.from_palettes(x, scale), weight, rtol=1e-6, atol=0)
    assert layout.scale_shape == (6,)
    assert PaletteLayout((6, 8), ClusterSpec(bits=2)).channel_scale(weight) is None


def test_per_channel_scale_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="per_channel_scale must be True or False; got 'yes'"):
        ClusterSpec(per_channel_scale="yes")  # type: ignore[arg-type]


def test_a_palette_needs_its_scales_exactly_when_the_spec_has_them() -> None:
    layout = PaletteLayout((4, 8), ClusterSpec(bits=1, per_channel_scale=True), name="fc.weight")
    lut, indices = torch.zeros(1, 2, 1), torch.zeros(1, 32, dtype=torch.long)
    message = r"fc\.weight: per_channel_scale needs a scale of shape \(4,\)"
    with pytest.raises(ValueError, match=message):
        Palette(lut, indices, layout)
    with pytest.raises(ValueError, match="finite floats > 0"):
        Palette(lut, indices, layout, scale=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    plain = PaletteLayout((4, 8), ClusterSpec(bits=1), name="fc.weight")
    with pytest.raises(ValueError, match="per_channel_scale=False"):
        Palette(lut, indices, plain, scale=torch.ones(4))



def test_set_centroids_refuses_the_scales_a_palette_refuses() -> None:
    scaled = PaletteLayout((4, 8), ClusterSpec(bits=1, per_channel_scale=True), name="fc.weight")
    plain = PaletteLayout((4, 8), ClusterSpec(bits=1), name="fc.weight")
    lut = torch.zeros(1, 2, 1)
    with pytest.raises(ValueError, match=r"fc\.weight: per_channel_scale needs a scale of shape "
                       r"\(4,\) \(one per output channel\); got None"):
        DKMParametrization(scaled).set_centroids(lut)
    with pytest.raises(ValueError, match=r"needs a scale of shape \(4,\) .*; got \(3,\)"):
        DKMParametrization(scaled).set_centroids(lut, torch.ones(3))
    with pytest.raises(ValueError, match=r"fc\.weight: per-channel scales must be finite floats"):
        DKMParametrization(scaled).set_centroids(lut, torch.tensor([1.0, float("inf"), 1, 1]))
    with pytest.raises(ValueError, match=r"fc\.weight: a per-channel scale was given but the "
                       "spec has per_channel_scale=False"):
        DKMParametrization(plain).set_centroids(lut, torch.ones(4))
    p = DKMParametrization(scaled)
    p.set_centroids(lut, torch.tensor([0.5, 1.0, 2.0, 4.0]))
    assert p.is_initialized and p.scale.tolist() == [0.5, 1.0, 2.0, 4.0]


def test_a_scale_that_float16_cannot_hold_keeps_the_palette_in_float32() -> None:
    layout = PaletteLayout((4, 8), ClusterSpec(bits=1, per_channel_scale=True), name="fc.weight")
    lut, indices = torch.tensor([-1.0, 1.0]).reshape(1, 2, 1), torch.zeros(1, 32, dtype=torch.long)
    exact = Palette(lut, indices, layout, scale=torch.tensor([0.5, 0.25, 2.0, 1.0]))
    assert exact.float16_problem() is None
    assert exact.stored_lut_dtype("float16") == torch.float16
    subnormal = Palette(lut, indices, layout, scale=torch.tensor([0.5, 1e-7, 2.0, 1.0]))
    assert "per-channel scale is not exactly a float16 number" in subnormal.float16_problem()
    assert subnormal.stored_lut_dtype("float16") == torch.float32

# -- post-training k-means ----------------------------------------------------------------------
def test_palettize_clusters_every_layer_kind_per_channel_and_stores_the_scales() -> None:
    model = with_channel_magnitudes(EveryLayer())
    original = copy.deepcopy(model)
    palettes = scaled_palettes(model)
    assert set(palettes) == {"embed.weight", "conv1.weight", "conv.weight", "deconv.weight",
                             "fc.weight"}
    for name, palette in palettes.items():
        weight = model.get_parameter(name)
        axis = palette.layout.group_axis
        assert palette.scale.shape == (weight.shape[axis],)
        assert torch.equal(palette.weight(), weight), name
        limit = 4 ** palette.layout.spec.cluster_dim if palette.layout.spec.cluster_dim > 1 else 4
        most = limit * palette.layout.num_palettes
        assert per_channel_distinct(weight, palette.scale, axis) <= most
    assert palettes["deconv.weight"].layout.group_axis == 1  # ConvTranspose: channels on dim 1
    # channels of mixed magnitude: the small ones keep their shape instead of snapping to 0
    plain = copy.deepcopy(original)
    palettize(plain, bits=2, min_size=256, n_init=1, max_iter=20, targets=["fc"])
    small = slice(0, 8)  # the 8 smallest-magnitude channels of fc
    err_plain = (plain.fc.weight[small] - original.fc.weight[small]).abs().mean()
    err_scaled = (model.fc.weight[small] - original.fc.weight[small]).abs().mean()
    assert err_scaled < 0.5 * err_plain


def test_sensitivity_weighted_palettize_accepts_per_channel_scale() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    data = [(torch.randn(16, 32), torch.randint(0, 4, (16,))) for _ in range(2)]

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    palettes = palettize(model, bits=2, min_size=1, per_channel_scale=True,
                         calibration=(data, loss_fn), targets=["0"])
    assert torch.equal(palettes["0.weight"].weight(), model[0].weight)


# -- the artifact and the report ----------------------------------------------------------------
def test_a_float32_artifact_loads_scaled_weights_bit_for_bit(tmp_path) -> None:
    model = with_channel_magnitudes(EveryLayer())
    palettes = scaled_palettes(model)
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=torch.float32)
    fresh = with_channel_magnitudes(EveryLayer())
    loaded = load_compressed(fresh, path)
    for name, palette in palettes.items():
        assert torch.equal(fresh.get_parameter(name), model.get_parameter(name)), name
        assert torch.equal(loaded[name].scale, palette.scale)
        assert torch.equal(loaded[name].weight(), fresh.get_parameter(name))
    read = read_palettes(path)
    assert all(torch.equal(read[n].scale, p.scale) for n, p in palettes.items())


def test_a_float16_artifact_stores_scales_in_float16_and_multiplies_in_float32(tmp_path) -> None:
    model = with_channel_magnitudes(EveryLayer())
    palettes = scaled_palettes(model)
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("scale/fc.weight").dtype == torch.float16
        assert torch.equal(f.get_tensor("scale/fc.weight").float(), palettes["fc.weight"].scale)
    fresh = with_channel_magnitudes(EveryLayer())
    load_compressed(fresh, path)
    for name, p in palettes.items():
        expected = Palette(p.lut.half().float(), p.indices, p.layout, scale=p.scale).weight()
        assert torch.equal(fresh.get_parameter(name), expected), name


@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.float32])
def test_the_report_counts_the_scales_as_the_file_stores_them(tmp_path, lut_dtype) -> None:
    model = with_channel_magnitudes(EveryLayer())
    palettes = scaled_palettes(model)
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=lut_dtype)
    report = CompressionReport.build(model, palettes, lut_dtype=lut_dtype)
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0] + 8
    assert os.path.getsize(path) - header == report.total_bytes
    fc = next(layer for layer in report.layers if layer.name == "fc.weight")
    assert fc.scale_bytes == 32 * lut_dtype.itemsize
    assert fc.compressed_bytes == fc.lut_bytes + fc.scale_bytes + fc.index_bytes
    assert CompressionReport.from_dict(report.to_dict()) == report


def test_a_tampered_scale_is_refused_naming_the_tensor(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = with_channel_magnitudes(EveryLayer())
    path = save_compressed(model, tmp_path / "m.safetensors", scaled_palettes(model))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["scale/fc.weight"] = tensors["scale/fc.weight"][:-1].clone()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_compressed(with_channel_magnitudes(EveryLayer()), path)


# -- DKM, finalize and checkpoints --------------------------------------------------------------
def test_dkm_trains_in_scaled_units_and_finalize_keeps_the_scales() -> None:
    model = with_channel_magnitudes(EveryLayer())
    targets = select_targets(model, ClusterSpec(bits=2, per_channel_scale=True), min_size=256,
                             targets=["fc", "deconv"])
    tensors = attach(model, targets)
    parametrization = tensors["fc.weight"].parametrization
    assert torch.equal(parametrization.scale, channel_scale(tensors["fc.weight"].original, 0))
    model.train()
    model.fc(torch.randn(4, 64)).square().sum().backward()
    grad = tensors["fc.weight"].original.grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())  # every channel learns
    palettes = finalize(model)
    for name in ("fc.weight", "deconv.weight"):
        palette = palettes[name]
        weight = model.get_parameter(name)
        assert torch.equal(palette.weight(), weight)
        assert per_channel_distinct(weight, palette.scale, palette.layout.group_axis) <= 4


def test_a_mid_dkm_checkpoint_with_scales_resumes_into_a_finalized_model(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = DKMCallback(bits=2, per_channel_scale=True, save_dir=str(tmp_path / "a"))
    model = TinyNet()
    trainer(tmp_path, callbacks=[first, checkpoint], enable_checkpointing=True,
            max_epochs=2).fit(model)
    assert first.palettes["body.0.weight"].scale.shape == (64,)
    second = DKMCallback(bits=2, per_channel_scale=True, save_dir=str(tmp_path / "b"))
    t = trainer(tmp_path, callbacks=[second], max_epochs=3)
    t.fit(model, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    palette = second.palettes["body.0.weight"]
    assert torch.equal(palette.weight(), model.body[0].weight)
    with safe_open(str(second.artifact_path), framework="pt") as f:
        assert "scale/body.0.weight" in f.keys()  # noqa: SIM118
    layer = next(x for x in second.report.layers if x.name == "body.0.weight")
    assert layer.scale_bytes == 64 * 2


def test_an_override_can_turn_per_channel_scale_on_for_one_tensor(tmp_path) -> None:
    cb = DKMCallback(bits=2, overrides={"body.2": {"per_channel_scale": True}},
                     save_dir=str(tmp_path / "dkm"))
    trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(TinyNet())
    assert cb.palettes["body.2.weight"].scale is not None
    assert cb.palettes["body.0.weight"].scale is None


@pytest.mark.parametrize("method", ["hard", "deep_kmeans"])
def test_the_other_methods_cluster_in_scaled_units_too(tmp_path, method) -> None:
    cb = DKMCallback(bits=2, per_channel_scale=True, method=method, save_dir=str(tmp_path / "d"))
    model = TinyNet()
    trainer(tmp_path, callbacks=[cb], max_epochs=2).fit(model)
    palette = cb.palettes["body.2.weight"]
    assert torch.equal(palette.weight(), model.body[2].weight)
    assert per_channel_distinct(model.body[2].weight, palette.scale, 0) <= 4
