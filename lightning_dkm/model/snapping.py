"""State dicts with the DKM keys, loaded into a finalized model: every weight snapped.

``model.state_dict()`` of a model during DKM (and so a weights-only Lightning checkpoint, which
Lightning writes without calling any callback) holds ``<module>.parametrizations.<name>.original``
and the parametrization's buffers, where a finalized model expects ``<module>.<name>``.
:func:`snap_state_dict` converts such a state dict as finalize would have converted the model
(each weight snapped to its checkpointed centroids); :func:`snap_on_load` registers it as a load
pre-hook, so ``model.load_state_dict(checkpoint["state_dict"])`` just works;
:func:`checkpoint_clustered_names` lists the clustered tensors such a state dict holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..engine.layout import PaletteLayout
from ..engine.numerics import hard_assign
from ..engine.palette import Palette
from .carried import metadata_entries, version_key
from .state import parametrization_prefix, parametrized_originals, split_name
from .targets import clusterable_parameters

__all__ = [
    "checkpoint_clustered_names",
    "palette_from_entries",
    "snap_on_load",
    "snap_state_dict",
]

def palette_from_entries(
    model: nn.Module, name: str, entries: Mapping[str, Tensor], prefix: str = ""
) -> Palette | None:
    """The palette of the clustered tensor ``name`` from its DKM entries (``entries`` holds
    ``<module>.parametrizations.<param>.original`` and ``.0.centroids``, under ``prefix``): its
    original snapped to its centroids, as finalize makes it. ``None`` if ``model`` has no such
    module or the centroids were never seeded."""
    module_name, param_name = split_name(name)
    base = parametrization_prefix(name, prefix)
    original = entries.get(base + "original")
    centroids = entries.get(base + "0.centroids")
    seeded = bool(entries.get(base + "0.initialized", False))
    if original is None or centroids is None or not seeded:
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    axes = {p: (g, v) for p, g, v in clusterable_parameters(module)}
    if param_name not in axes or centroids.dim() != 3:
        return None
    scale = entries.get(base + "0.scale")
    layout = PaletteLayout.of_lut(tuple(original.shape), tuple(centroids.shape),
                                  *axes[param_name], per_channel_scale=scale is not None,
                                  name=name)
    idx, _ = hard_assign(layout.to_palettes(original, scale), centroids)
    return Palette(centroids.to(original.dtype), idx, layout,
                   scale=None if scale is None else scale.to(original.dtype))


def snap_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Turn the DKM entries of a mid-training ``state_dict`` (module docstring) into plain,
    snapped weights, in place; returns the converted parameter names.

    Each entry whose module exists in ``model`` *unparametrized* becomes the weight finalize
    would have made from that checkpoint (as it is if the centroids were never seeded), its DKM
    keys dropped. A further owner of a tied weight (no centroids of its own) gets the snapped
    tensor of the owner it shares storage with. Entries of modules that are parametrized again
    (DKM re-attached for another fit) are left alone: that model expects them as they are.
    """
    modules = dict(model.named_modules())
    converted: list[str] = []
    snapped_by_storage: dict[int, torch.Tensor] = {}
    ties: list[tuple[str, str]] = []  # (key, name) of tied owners
    for key, name in parametrized_originals(state_dict, prefix).items():
        module_name, param_name = split_name(name)
        module = modules.get(module_name)
        if module is None or parametrize.is_parametrized(module, param_name):
            continue
        buffer_prefix = parametrization_prefix(name, prefix) + "0."
        if buffer_prefix + "centroids" not in state_dict:
            ties.append((key, name))
            continue
        if param_name not in {p for p, _, _ in clusterable_parameters(module)}:
            continue
        weight = state_dict[key]
        palette = palette_from_entries(model, name, state_dict, prefix)
        for stale in [k for k in state_dict if k.startswith(buffer_prefix)] + [key]:
            del state_dict[stale]
        snapped = weight if palette is None else palette.weight()
        snapped_by_storage[_storage_of(weight)] = snapped
        state_dict[prefix + name] = snapped
        if palette is not None:
            # what a finalized model carries about this palette (lightning_dkm.model.carried)
            carried = set(dict(module.named_buffers(recurse=False)))
            for entry, value in metadata_entries(palette, prefix).items():
                if entry.rpartition(".")[2] in carried:
                    state_dict[entry] = value.to(weight.device)
        converted.append(name)
    version = version_key(prefix)
    if converted and version not in state_dict and version.removeprefix(prefix) in dict(
        model.named_buffers(recurse=False)
    ):
        state_dict[version] = torch.tensor(1)
    for key, name in ties:
        snapped = snapped_by_storage.get(_storage_of(state_dict[key]))
        if snapped is None:
            continue
        del state_dict[key]
        state_dict[prefix + name] = snapped
        converted.append(name)
    return converted


def _storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


_SNAP_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def snap_on_load(model: nn.Module) -> None:
    """Let ``model`` (finalized) load checkpoints that hold the DKM keys in their state dict
    (a weights-only checkpoint, or ``state_dict()`` of a parametrized model): its
    ``load_state_dict`` then converts them with :func:`snap_state_dict` first. Registering
    twice has no further effect."""
    if model in _SNAP_HOOKS:
        return

    def hook(module, state_dict, prefix, *args) -> None:
        snap_state_dict(module, state_dict, prefix)

    _SNAP_HOOKS[model] = model.register_load_state_dict_pre_hook(hook)


def checkpoint_clustered_names(state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The DKM-clustered parameter names a ``state_dict`` with the DKM keys holds: each
    ``<module>.parametrizations.<name>.original`` with its ``.0.centroids`` beside it. Empty for
    a plain state dict (:func:`split_dkm_state`)."""
    return [name for name in parametrized_originals(state_dict, prefix).values()
            if parametrization_prefix(name, prefix) + "0.centroids" in state_dict]
