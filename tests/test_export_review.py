"""Specification of the artifact's loader where the model it fills differs from the model that
was saved: another floating-point dtype."""

from __future__ import annotations

import pytest
import torch
from plain_models import EveryLayer, every_layer_inputs, with_channel_magnitudes

from lightning_dkm import load_compressed, palettize, save_compressed
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
