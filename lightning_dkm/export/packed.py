"""Packed inference: clustered weights kept as LUT + bit-packed indices, decoded per forward.

:func:`pack` replaces each clustered weight ``Parameter`` of a finalized model by three buffers
on its module, ``<param>_lut`` (``(P, 2**bits, cluster_dim)``, the model's dtype),
``<param>_packed_indices`` (uint8, ``ceil(P * n * bits / 8)`` bytes,
:mod:`lightning_dkm.engine.bitpack`)
and, with per-channel scales, ``<param>_scale``; a forward pre-hook decodes the dense weight
into a plain attribute just before the module runs and a forward hook drops it after, so the
model's parameters and buffers hold about the artifact's bytes and only one layer's dense
weight exists at a time. Outputs equal the dense model's bit for bit (the decoded weight is
``Palette.weight()``). The price is the decode (unpack + gather) on every forward:
``benchmarks/packed_inference.py`` measures it.

A packed model is for inference: its clustered weights are not Parameters (nothing to train)
and its ``state_dict`` holds the packed buffers. :func:`unpack` turns it back into the dense
finalized model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..engine.bitpack import pack_bits, unpack_bits
from ..engine.layout import PaletteLayout
from ..engine.palette import Palette
from ..model.carried import carried_palettes, carry_palettes, discard_palettes
from ..model.state import qualified_name, split_name

__all__ = ["is_packed", "pack", "packed_palettes", "unpack"]


@dataclass
class _Packed:
    """What a packed module remembers about one of its weights."""

    param_name: str
    layout: PaletteLayout
    handles: tuple[RemovableHandle, RemovableHandle]
    requires_grad: bool
    #: For one scalar palette at 1/2/4/8 bits: the values of every possible packed byte,
    #: ``(256, 8 // bits)``, so decoding is one gather (made at the first forward).
    byte_values: Tensor | None = None
    #: The LUT the table was made from (storage, version, dtype, device): a LUT that was
    #: replaced, edited in place, cast or moved makes it again.
    byte_values_of: tuple | None = None


_ATTRIBUTE = "_lightning_dkm_packed"


def _names(param_name: str) -> tuple[str, str, str]:
    return f"{param_name}_lut", f"{param_name}_packed_indices", f"{param_name}_scale"


def _byte_values(lut: Tensor, bits: int) -> Tensor:
    """``(256, 8 // bits)``: the LUT values of the indices packed in each possible byte."""
    per = 8 // bits
    byte = torch.arange(256, device=lut.device).unsqueeze(1)
    shifts = bits * torch.arange(per, device=lut.device)
    return lut.reshape(-1)[(byte >> shifts) & ((1 << bits) - 1)]


def _decode(module: nn.Module, packed: _Packed) -> Tensor:
    """The dense weight, equal to ``Palette.weight()`` bit for bit."""
    lut_name, indices_name, scale_name = _names(packed.param_name)
    layout = packed.layout
    P, n, d = layout.palette_shape
    lut = module._buffers[lut_name]
    scale = module._buffers.get(scale_name)
    data = module._buffers[indices_name]
    bits = layout.spec.bits
    if P == 1 and d == 1 and 8 % bits == 0:  # one gather from the per-byte value table
        key = (lut.data_ptr(), lut._version, lut.dtype, lut.device)
        if packed.byte_values_of != key:
            packed.byte_values, packed.byte_values_of = _byte_values(lut, bits), key
        x = packed.byte_values[data.long()].reshape(-1)[:n].view(1, n, 1)
        if scale is None:
            return layout.from_palettes(x)
        compute = torch.promote_types(lut.dtype, torch.float32)
        return layout.from_palettes(x.to(compute), scale.to(compute)).to(lut.dtype)
    return _palette(module, packed).weight()


def _palette(module: nn.Module, packed: _Packed) -> Palette:
    """The palette one packed weight's buffers hold."""
    lut_name, indices_name, scale_name = _names(packed.param_name)
    P, n, _ = packed.layout.palette_shape
    lut = module._buffers[lut_name]
    indices = unpack_bits(module._buffers[indices_name], packed.layout.spec.bits, P * n)
    return Palette(lut, indices.view(P, n).to(lut.device), packed.layout,
                   module._buffers.get(scale_name))


def _before_forward(module: nn.Module, args) -> None:
    for packed in getattr(module, _ATTRIBUTE).values():
        object.__setattr__(module, packed.param_name, _decode(module, packed))


def _after_forward(module: nn.Module, args, output) -> None:
    for packed in getattr(module, _ATTRIBUTE).values():
        module.__dict__.pop(packed.param_name, None)


def is_packed(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds a packed weight."""
    return any(getattr(m, _ATTRIBUTE, None) for m in model.modules())


@torch.no_grad()
def pack(
    model: nn.Module, palettes: Mapping[str, Palette] | None = None, *, verify: bool = True
) -> nn.Module:
    """Pack the clustered weights of a finalized ``model`` in place and return it.

    Args:
        model: a finalized model (it carries its palettes, :mod:`lightning_dkm.model.carried`).
        palettes: the palettes to pack (default: the ones the model carries, checked against
            its weights); each must reproduce its weight.
        verify: check that each palette reproduces the weight it replaces (``False`` only where
            the weight was never filled, as ``load_compressed(..., packed=True)`` does).

    Raises:
        ValueError: a palette that does not match its weight or that the weight's dtype cannot
            hold (:meth:`Palette.check_fits <lightning_dkm.engine.palette.Palette.check_fits>`),
            or a weight that is tied to another name (pack the model it came from untied, or
            keep it dense); checked for every palette before anything is packed.
    """
    palettes = carried_palettes(model) if palettes is None else dict(palettes)
    shared: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in shared and (name in palettes or shared[key] in palettes):
            raise ValueError(
                f"{name} and {shared[key]} are one tied Parameter; packing would untie them, so "
                "tied weights are not packed (exclude them or keep the model dense)"
            )
        shared.setdefault(key, name)
    checked = []  # every palette checked before any weight is replaced
    for name, palette in palettes.items():
        module_name, param_name = split_name(name)
        module = model.get_submodule(module_name)
        weight = module._parameters.get(param_name)
        if weight is None:
            raise ValueError(f"{name} is not a Parameter of the model (already packed?)")
        if verify:
            palette.check_reproduces(weight, name, "Nothing was packed")
        palette.check_fits(weight.dtype)  # the buffers below hold it in the weight's dtype
        checked.append((module, param_name, weight, palette))
    for module, param_name, weight, palette in checked:
        lut_name, indices_name, scale_name = _names(param_name)
        del module._parameters[param_name]
        if weight.is_meta:  # never materialised (load_compressed into a meta-built model)
            weight = torch.empty(0, dtype=weight.dtype, device=palette.lut.device)
        cast = palette.to(weight.device, weight.dtype)
        module.register_buffer(lut_name, cast.lut)
        module.register_buffer(
            indices_name,
            pack_bits(palette.indices.detach().cpu(), palette.layout.spec.bits).to(weight.device),
        )
        if cast.scale is not None:
            module.register_buffer(scale_name, cast.scale)
        registry = module.__dict__.setdefault(_ATTRIBUTE, {})
        if not registry:
            handles = (module.register_forward_pre_hook(_before_forward),
                       module.register_forward_hook(_after_forward))
        else:
            handles = next(iter(registry.values())).handles
        registry[param_name] = _Packed(param_name, palette.layout, handles, weight.requires_grad)
    discard_palettes(model, list(palettes))  # the packed buffers are the record now
    return model


def packed_palettes(model: nn.Module) -> dict[str, Palette]:
    """The palettes of a packed model's weights, by qualified name (decoded from its buffers)."""
    out = {}
    for module_name, module in model.named_modules():
        for param_name, packed in getattr(module, _ATTRIBUTE, {}).items():
            out[qualified_name(module_name, param_name)] = _palette(module, packed)
    return out


@torch.no_grad()
def unpack(model: nn.Module) -> nn.Module:
    """Turn a packed ``model`` back into the dense finalized model (in place), carrying its
    palettes again."""
    palettes = packed_palettes(model)
    for name, palette in palettes.items():
        module_name, param_name = split_name(name)
        module = model.get_submodule(module_name)
        packed = module.__dict__[_ATTRIBUTE].pop(param_name)
        for buffer in _names(param_name):
            module._buffers.pop(buffer, None)
        module.register_parameter(
            param_name, nn.Parameter(palette.weight(), requires_grad=packed.requires_grad)
        )
        if not module.__dict__[_ATTRIBUTE]:
            for handle in packed.handles:
                handle.remove()
            del module.__dict__[_ATTRIBUTE]
    carry_palettes(model, palettes)
    return model
