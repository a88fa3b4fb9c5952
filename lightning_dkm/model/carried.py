"""The palettes a finalized model carries with it, as coremltools' compression metadata.

``finalize``, ``palettize`` and ``load_compressed`` record every clustered tensor's palette on
the module that owns it, as buffers named by coremltools' documented protocol (coremltools
``optimize/torch/_utils/metadata_utils.py``; ``ct.convert`` reads them from the traced model's
``state_dict`` and writes one ``constexpr_lut_to_dense`` op per tensor):

* ``_COREML_/<param>/lut``: the LUT, float32, shape ``weight.shape`` with the output-channel axis
  replaced by the number of palettes ``P`` and every other axis by 1, then ``(2**bits,
  cluster_dim)``: one block of ``group_size`` consecutive channels per palette;
* ``_COREML_/<param>/vector_axis``: the axis the ``cluster_dim``-vectors run along;
* ``_COREML_/<param>/palettization_scale``: the per-channel scales (``per_channel_scale``),
  shape ``weight.shape`` with every axis but the output-channel axis set to 1;
* ``_COREML_/<param>/compression_type``: ``[2]`` (palettization);
* ``_COREML_/metadata_version`` on the root module: ``1``.

These buffers are the model's own record of its compression: they are in ``state_dict`` (so a
checkpoint of the finalized model holds them), they move with ``.to()`` and they are visible
through DDP or ``torch.compile`` wrappers. :func:`carried_palettes` reads the palettes back from
them: the layout from the buffers' shapes, the indices by snapping the weight to its LUT, and it
checks that ``LUT[indices]`` (times the scales) still equals the weight, so a weight changed after
finalize is an error that names it, never a silently different palette.

The artifact stores palettes its own way (bit-packed indices) and leaves these buffers out, the
report does not count them (they duplicate the LUT), and ``load_compressed`` records them again
on the model it fills.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..engine.layout import PaletteLayout
from ..engine.numerics import hard_assign
from ..engine.palette import Palette
from .state import (
    COMPRESSION_METADATA_PREFIX,
    is_compression_metadata,
    module_prefix,
    qualified_name,
    split_name,
    unwrap,
)

__all__ = [
    "carried_key",
    "carried_palettes",
    "carry_palettes",
    "discard_palettes",
    "expect_carried_buffers",
    "is_compression_metadata",
    "palette_tensor",
]

_SEP = "/"
_VERSION_BUFFER = COMPRESSION_METADATA_PREFIX + _SEP + "metadata_version"
_PALETTIZATION = 2  # coremltools' CompressionType.palettization
_KEYS = ("lut", "vector_axis", "palettization_scale", "compression_type")


def _buffer_name(param_name: str, key: str) -> str:
    return _SEP.join((COMPRESSION_METADATA_PREFIX, param_name, key))


def carried_key(name: str, key: str = "", prefix: str = "") -> str:
    """The ``state_dict`` key of the buffer ``key`` (``"lut"``, ...) that carries the palette of
    the parameter ``name``, under ``prefix``; with ``key=""``, what all of them start with."""
    module_name, param_name = split_name(name)
    return module_prefix(module_name, prefix) + _buffer_name(param_name, key)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, param_name = split_name(name)
    try:
        return model.get_submodule(module_name), param_name
    except AttributeError as err:
        raise ValueError(f"{name}: the model has no module {module_name!r}") from err


def _metadata(palette: Palette) -> dict[str, Tensor]:
    """The buffers of one palette (float32 LUT and scales, CPU-independent shapes)."""
    layout = palette.layout
    values = {
        "lut": layout.broadcast_lut(palette.lut.detach().float()).clone(),
        "vector_axis": torch.tensor(layout.vector_axis),
        "compression_type": torch.tensor([_PALETTIZATION]),
    }
    if palette.scale is not None:
        values["palettization_scale"] = layout.broadcast_scale(palette.scale.detach().float()
                                                               ).clone()
    return values


def metadata_entries(palette: Palette, prefix: str = "") -> dict[str, Tensor]:
    """The ``state_dict`` entries (under ``prefix``) that carry ``palette``, whose layout is
    named by its qualified parameter name; for converting a checkpoint written before finalize
    into what a finalized model expects."""
    return {carried_key(palette.layout.name, key, prefix): value
            for key, value in _metadata(palette).items()}


def version_key(prefix: str = "") -> str:
    """The ``state_dict`` key of the metadata version buffer under ``prefix``."""
    return prefix + _VERSION_BUFFER


def discard_palettes(model: nn.Module, names: list[str] | None = None) -> None:
    """Remove the carried palettes of ``names`` (default: all) and, when none is left, the
    version buffer."""
    for module, buffer, qualified, _ in list(_metadata_buffers(model)):
        if names is None or qualified in names:
            del module._buffers[buffer]
    if not carried_names(model) and _VERSION_BUFFER in model._buffers:
        del model._buffers[_VERSION_BUFFER]


def palette_tensor(name: str, palette: Palette, tensor: Tensor | None) -> Tensor:
    """``tensor``, the model's tensor ``name`` (``None``: it has none), which ``palette`` must
    describe: a ``ValueError`` naming both unless it is a tensor of the palette's shape."""
    if tensor is None:
        raise ValueError(
            f"palette {name!r} has no tensor of that name in model.state_dict(); pass the "
            "finalized model (after finalize() or palettize()) and its palettes"
        )
    if tuple(tensor.shape) != palette.layout.shape:
        raise ValueError(
            f"palette {name!r} is for shape {palette.layout.shape}, but the model's {name!r} "
            f"has shape {tuple(tensor.shape)}; pass the palettes that finalize()/palettize() "
            "returned for this model"
        )
    return tensor


@torch.no_grad()
def carry_palettes(model: nn.Module, palettes: Mapping[str, Palette]) -> None:
    """Record ``palettes`` (by qualified parameter name) on ``model`` as coremltools'
    compression-metadata buffers (module docstring), replacing what those tensors carried.

    The buffers go on the device of each weight. ``finalize``, ``palettize`` and
    ``load_compressed`` call this; call it yourself for palettes from elsewhere (e.g.
    ``DKMCallback.palettes`` in the process that launched a ``ddp_spawn`` fit).

    Raises:
        ValueError: a name that is not a parameter of ``model``, or a palette whose shape
            differs from that parameter's.
    """
    for name, palette in palettes.items():
        module, param_name = _owner(model, name)
        weight = getattr(module, param_name, None)
        weight = palette_tensor(name, palette, weight if isinstance(weight, Tensor) else None)
        for key in _KEYS:  # a tensor re-clustered without scales must lose its old ones
            module._buffers.pop(_buffer_name(param_name, key), None)
        for key, value in _metadata(palette).items():
            module.register_buffer(_buffer_name(param_name, key), value.to(weight.device))
    if palettes:
        model.register_buffer(_VERSION_BUFFER, torch.tensor(1))


def carried_names(model: nn.Module) -> list[str]:
    """The qualified names of the parameters ``model`` carries a palette for."""
    return [name for _, _, name, key in _metadata_buffers(model) if key == "lut"]


def _metadata_buffers(model: nn.Module):
    """``(module, buffer name, qualified parameter name, key)`` of every per-parameter
    compression-metadata buffer (``_COREML_/<param>/<key>``; the version buffer is not one)."""
    for module_name, module in model.named_modules():
        for buffer in module._buffers:
            parts = buffer.split(_SEP)
            if is_compression_metadata(buffer) and len(parts) == 3:
                qualified = qualified_name(module_name, parts[1])
                yield module, buffer, qualified, parts[2]


@torch.no_grad()
def carried_palettes(model: nn.Module) -> dict[str, Palette]:
    """The palettes ``model`` carries (module docstring), by qualified parameter name.

    Each palette's LUT and scales are in the weight's dtype and on its device; its indices are
    the nearest LUT entry of every vector, so ``palette.weight()`` is the model's weight.

    Raises:
        ValueError: a carried buffer that is malformed, or a weight that ``LUT[indices]``
            (times its scales) no longer reproduces: it changed after finalize (more training
            or an in-place edit). The message names the weight.
    """
    model = unwrap(model)
    palettes: dict[str, Palette] = {}
    for name in carried_names(model):
        module, param_name = _owner(model, name)
        weight = getattr(module, param_name)
        buffers = {
            key: module._buffers.get(_buffer_name(param_name, key)) for key in _KEYS
        }
        layout = _layout_of(name, weight, buffers)
        lut = buffers["lut"].reshape(layout.num_palettes, layout.spec.num_centroids, -1)
        scale = buffers["palettization_scale"]
        scale = None if scale is None else scale.reshape(-1)
        x = layout.to_palettes(weight.detach().float(), scale)
        indices, _ = hard_assign(x, lut.float())
        palette = Palette(  # in the weight's dtype; one the weight's dtype cannot hold fails
            lut=lut.clone(), indices=indices, layout=layout,
            scale=None if scale is None else scale.clone(),
        ).to(dtype=weight.dtype)
        palette.check_reproduces(
            weight, name, "Finalize or palettize the model again, or discard the palette the "
            "model carries with lightning_dkm.discard_palettes(model)")
        palettes[name] = palette
    return palettes


def _layout_of(name: str, weight: Tensor, buffers: dict[str, Tensor | None]) -> PaletteLayout:
    """The :class:`PaletteLayout` that the carried buffers of ``weight`` describe."""
    lut, axis, scale = buffers["lut"], buffers["vector_axis"], buffers["palettization_scale"]
    ndim = weight.dim()
    if lut is None or lut.dim() != ndim + 2 or axis is None or axis.numel() != 1:
        raise ValueError(
            f"{name}: malformed palette buffers: the LUT must have {ndim + 2} dims (got "
            f"{None if lut is None else tuple(lut.shape)}) and vector_axis one value"
        )
    vector_axis = int(axis) % ndim
    blocks = [i for i, size in enumerate(lut.shape[:ndim]) if size > 1]
    if scale is not None:
        channels = [i for i, size in enumerate(scale.shape) if size > 1]
        blocks = blocks or channels
    if len(blocks) > 1:
        raise ValueError(f"{name}: the LUT has palettes along several axes {blocks}")
    group_axis = blocks[0] if blocks else (1 if vector_axis == 0 else 0)
    return PaletteLayout.of_lut(
        tuple(weight.shape), (lut.shape[group_axis], *lut.shape[-2:]), group_axis, vector_axis,
        per_channel_scale=scale is not None, name=name,
    )


def expect_carried_buffers(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Prepare a fresh ``model`` to load a ``state_dict`` written from a finalized one: register
    (empty) compression-metadata buffers of the shapes ``state_dict`` holds, so a strict
    ``model.load_state_dict(state_dict)`` accepts them and the model carries the palettes."""
    for key, value in state_dict.items():
        module_name, _, buffer = key.rpartition(".")  # a buffer name holds no "."
        if not is_compression_metadata(buffer):
            continue
        module = model.get_submodule(module_name)
        if buffer not in module._buffers:
            module.register_buffer(buffer, torch.empty_like(value))
