"""Specification of the artifact's loader where the model it fills differs from the model that
was saved: another floating-point dtype, or weights tied where the file stores two tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from plain_models import EveryLayer, every_layer_inputs, with_channel_magnitudes
from torch import nn

from lightning_dkm import load_compressed, pack, palettize, save_compressed, unpack
from lightning_dkm.model.carried import carried_palettes

# -- a model of another dtype than the saved one -----------------------------------------------


def _scaled_artifact(tmp_path, lut_dtype: torch.dtype):
    torch.manual_seed(0)
    model = with_channel_magnitudes(EveryLayer())
    palettize(model, bits=3, per_channel_scale=True, min_size=256, n_init=1, max_iter=10)
    return save_compressed(model, tmp_path / "m.safetensors", lut_dtype=lut_dtype)


@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_per_channel_scales_load_into_a_lower_precision_model_as_the_palettes_it_returns(
    tmp_path, lut_dtype, model_dtype
) -> None:
    """A float32 model's artifact loaded into a bfloat16 / float16 instance: every loaded weight
    is ``palette.weight()`` of the palette returned (and carried) for it, so the loaded model
    can be saved or exported again, and a packed load computes what the dense load does."""
    path = _scaled_artifact(tmp_path, lut_dtype)
    dense = EveryLayer().to(model_dtype)
    loaded = load_compressed(dense, path)
    for name, palette in loaded.items():
        assert torch.equal(palette.weight(), dense.get_parameter(name)), name
    carried_palettes(dense)  # raises when a carried palette does not reproduce its weight
    save_compressed(dense, tmp_path / "again.safetensors")

    packed = EveryLayer().to(model_dtype)
    load_compressed(packed, path, packed=True)
    tokens, image = every_layer_inputs(2)
    assert torch.equal(packed(tokens, image.to(model_dtype)), dense(tokens, image.to(model_dtype)))


def _beyond_float16(tmp_path, **palettize_args):
    """A float32 model whose weights (and so its centroids) lie beyond float16's 65504, saved:
    the artifact stores those LUTs in float32 (with a warning), as it must."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(1e6)
    palettize(model, bits=2, min_size=256, **palettize_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_compressed(model, tmp_path / "big.safetensors")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_a_palette_a_float16_model_cannot_hold_is_refused_naming_it_before_anything_loads(
    tmp_path, packed
) -> None:
    """Cast to float16 the LUT would be inf, and so would the weight and every output."""
    path = _beyond_float16(tmp_path)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=(
            r"big\.safetensors: cannot be loaded into this model \(its '0\.weight' is "
            r"torch\.float16\); nothing was loaded: 0\.weight: its LUT holds -?\d+(\.\d+)?, "
            r"beyond the range of torch\.float16 \(\|value\| <= 65504\).*would become inf")):
        load_compressed(model, path, packed=packed)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    load_compressed(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).bfloat16(), path)


def test_a_per_channel_scale_a_float16_model_cannot_hold_is_refused_naming_it(tmp_path) -> None:
    path = _beyond_float16(tmp_path, per_channel_scale=True)
    with pytest.raises(ValueError, match=r"0\.weight: its per-channel scales holds .*float16"):
        load_compressed(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half(), path)


def test_a_scaled_weight_beyond_the_dtype_is_refused_though_its_lut_and_scales_fit() -> None:
    """``LUT[indices] * scale`` is computed in float32 and then cast: 300 x 1000 = 3e5 is inf
    in float16 though 300 and 1000 are not."""
    from lightning_dkm.engine.layout import ClusterSpec, PaletteLayout
    from lightning_dkm.engine.palette import Palette

    layout = PaletteLayout((2, 4), ClusterSpec(bits=1, per_channel_scale=True), name="fc.weight")
    lut = torch.tensor([[[-300.0], [300.0]]])
    palette = Palette(lut, torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]]), layout,
                      scale=torch.tensor([1.0, 1000.0]))
    with pytest.raises(ValueError, match=r"fc\.weight: its weight \(LUT\[indices\] x "
                                         r"per-channel scale\) holds -?300000, beyond the range "
                                         r"of torch\.float16"):
        palette.to(dtype=torch.float16)
    assert torch.equal(palette.to(dtype=torch.bfloat16).weight(),
                       palette.weight(torch.bfloat16))


def test_pack_refuses_a_palette_the_weights_dtype_cannot_hold_before_packing_anything(
) -> None:
    from lightning_dkm.export.packed import is_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(1e6)
    palettes = palettize(model, bits=2, min_size=256)
    model.half()
    with pytest.raises(ValueError, match=r"1\.weight: its LUT holds .*torch\.float16"):
        pack(model, palettes, verify=False)
    assert not is_packed(model)


def test_an_unclustered_tensor_a_float16_model_cannot_hold_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].bias.fill_(1e5)
    palettize(model, bits=2, min_size=256)
    path = save_compressed(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"its '1\.bias' is torch\.float16\).*1\.bias: the "
                                         r"file's torch\.float32 tensor holds 100000"):
        load_compressed(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half(), path)


# -- tied weights in the model, two tensors in the file -------------------------------------


def _embedding_and_head(tied: bool, bias: bool = False) -> nn.Sequential:
    embed, head = nn.Embedding(64, 64), nn.Linear(64, 64, bias=bias)
    if tied:
        head.weight = embed.weight
    return nn.Sequential(embed, head)


def test_a_file_of_untied_weights_is_refused_by_a_model_that_ties_them(tmp_path) -> None:
    """The file holds ``0.weight`` (clustered) and ``1.weight`` (dense) as two tensors; a model
    whose ``1.weight`` is ``0.weight`` cannot hold both, so loading it is an error naming both,
    and the model is left as it was (not one of them silently overwritten by the other)."""
    torch.manual_seed(0)
    model = _embedding_and_head(tied=False)
    palettize(model, bits=2, targets=["0.weight"], n_init=1, max_iter=5)
    path = save_compressed(model, tmp_path / "u.safetensors", lut_dtype=torch.float32)
    target = _embedding_and_head(tied=True)
    before = target[0].weight.clone()
    with pytest.raises(ValueError, match=r"0\.weight.*1\.weight.*tied|tied.*0\.weight.*1\.weight"):
        load_compressed(target, path)
    assert torch.equal(target[0].weight, before)


def test_a_packed_load_into_a_tied_model_is_refused_before_anything_is_written(tmp_path) -> None:
    """``packed=True`` cannot keep a tied weight packed (:func:`pack` refuses it); the loader
    says so before it writes any tensor into the model or drops what it carries."""
    torch.manual_seed(0)
    model = _embedding_and_head(tied=True, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "shares its storage ... clustered once"
        palettize(model, bits=2, n_init=1, max_iter=5)
    path = save_compressed(model, tmp_path / "t.safetensors", lut_dtype=torch.float32)
    target = _embedding_and_head(tied=True, bias=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="tied"):
        load_compressed(target, path, packed=True)
    after = target.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_a_tied_weight_loaded_under_its_alias_alone_keeps_its_palette(tmp_path, packed) -> None:
    """The file stores the tied weight once, as ``0.weight`` (the embedding), with ``1.weight``
    (the head) as its alias. A model holding only the head (``strict=False``) gets that weight
    and its palette under its own name, as a tied model gets it with ``strict=True``: returned,
    carried (dense) or packed, never a weight without its palette, nor an untouched weight."""
    torch.manual_seed(0)
    model = _embedding_and_head(tied=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "shares its storage ... clustered once"
        palettize(model, bits=2, n_init=1, max_iter=5)
    path = save_compressed(model, tmp_path / "t.safetensors", lut_dtype=torch.float32)
    reference = _embedding_and_head(tied=True)
    expected = load_compressed(reference, path)["0.weight"]

    head_only = nn.Sequential(nn.Identity(), nn.Linear(64, 64, bias=False))
    loaded = load_compressed(head_only, path, strict=False, packed=packed)
    assert loaded.keys() == {"1.weight"}
    palette = loaded["1.weight"]
    assert palette.name == "1.weight"
    assert torch.equal(palette.lut, expected.lut) and torch.equal(palette.indices, expected.indices)
    x = torch.randn(3, 64)
    assert torch.equal(head_only(x), reference[1](x))  # the saved weight, not the initial one
    if packed:
        from lightning_dkm.export.packed import is_packed

        assert is_packed(head_only)
    else:
        assert carried_palettes(head_only).keys() == {"1.weight"}
        assert torch.equal(palette.weight(), head_only[1].weight)


# -- a packed model given to save_compressed ----------------------------------------------------


def test_saving_a_packed_model_is_refused_rather_than_written_as_dense_buffers(tmp_path) -> None:
    """A packed model's clustered weights are LUT + packed-index buffers, not Parameters:
    saving it would store them as dense state under names no fresh instance has (an artifact
    that loads into nothing, a report of no clustered tensor). ``save_compressed`` refuses it,
    naming ``unpack``, and writes nothing; after ``unpack`` it saves as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    palettize(model, bits=2, min_size=1, n_init=1, max_iter=5)
    pack(model)
    path = tmp_path / "p.safetensors"
    with pytest.raises(ValueError, match=r"packed.*unpack"):
        save_compressed(model, path)
    assert not path.exists()
    unpack(model)
    save_compressed(model, path)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    assert load_compressed(fresh, path).keys() == {"0.weight", "1.weight"}
