"""Model-level operations: attach DKM parametrizations to targets, find them, finalize them.

``attach`` registers a :class:`~lightning_dkm.engine.parametrization.DKMParametrization` on each
target and
initialises its centroids with seeded k-means++ (the same seed gives the same centroids in every
process). ``finalize`` snaps every clustered weight to its nearest centroid, removes the
parametrizations (the model is again a plain model of its own class, its Parameters keeping
their identity) and returns the palettes (LUT + indices) that the artifact and report use.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..engine.layout import ClusterSpec, PaletteLayout
from ..engine.numerics import hard_assign
from ..engine.palette import Palette
from ..engine.parametrization import DKMParametrization, Implementation, Mode, stable_seed
from ..engine.weighted import Gradient
from .carried import carry_palettes, discard_palettes, metadata_entries, version_key
from .targets import Target, clusterable_parameters
from .tied import TiedWeight

__all__ = [
    "ClusteredTensor",
    "attach",
    "checkpoint_clustered_names",
    "clustered_tensors",
    "finalize",
    "register_load_pre_hook",
    "release",
    "set_mode",
    "set_temperature",
    "snap_on_load",
    "snap_state_dict",
]


@dataclass(frozen=True)
class ClusteredTensor:
    """A parametrized weight: where it lives and the parametrization that clusters it."""

    name: str
    module: nn.Module
    param_name: str
    parametrization: DKMParametrization

    @property
    def original(self) -> nn.Parameter:
        """The trainable Parameter behind the clustered weight."""
        return self.module.parametrizations[self.param_name].original


def clustered_tensors(
    model: nn.Module, names: Iterable[str] | None = None
) -> dict[str, ClusteredTensor]:
    """Every DKM-parametrized weight of ``model`` (or those named in ``names``), by qualified
    parameter name."""
    wanted = None if names is None else set(names)
    found: dict[str, ClusteredTensor] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, DKMParametrization):
                    name = f"{module_name}.{param_name}" if module_name else param_name
                    if wanted is not None and name not in wanted:
                        continue
                    found[name] = ClusteredTensor(name, module, param_name, p)
    return found


def attach(
    model: nn.Module,
    targets: Iterable[Target],
    *,
    temperature: float = 1e-2,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    seed: int = 0,
    mode: Mode = "soft",
    initialize: bool = True,
    implementation: Implementation = "auto",
    gradient: Gradient = "unrolled",
) -> dict[str, ClusteredTensor]:
    """Register DKM on every target of ``model`` (idempotent: an already clustered tensor is
    left as it is) and return all clustered tensors.

    Each tensor's k-means++ seed is :func:`~lightning_dkm.engine.parametrization.stable_seed` of
    ``seed``
    and its name, so centroids do not depend on the order or number of processes.
    """
    modules = dict(model.named_modules())
    existing = clustered_tensors(model)
    # A finalized model clustered again: the palettes it carries describe the old weights.
    discard_palettes(model, [t.name for t in targets if t.name not in existing])
    for target in targets:
        if target.name in existing:
            continue
        module = modules[target.module_name]
        weight = getattr(module, target.param_name)
        target.layout.check(weight)
        parametrization = DKMParametrization(
            target.layout,
            temperature=temperature,
            max_iter=max_iter,
            epsilon=epsilon,
            seed=stable_seed(seed, target.name),
            mode=mode,
            implementation=implementation,
            gradient=gradient,
        ).to(weight.device)
        if initialize:
            parametrization.initialize(weight)
        # unsafe=True: skip the trial forward (a soft one would already move the centroids).
        parametrize.register_parametrization(
            module, target.param_name, parametrization, unsafe=True
        )
        for tied_module, tied_param in target.tied:
            parametrize.register_parametrization(
                modules[tied_module],
                tied_param,
                TiedWeight(module, target.param_name, target.name),
                unsafe=True,
            )
    return clustered_tensors(model)


def _tied_owners(model: nn.Module, names: set[str] | None) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of every :class:`TiedWeight` whose tensor is clustered as
    one of ``names`` (all of them for ``None``)."""
    found = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            if any(
                isinstance(p, TiedWeight) and (names is None or p.owner_name in names)
                for p in plist
            ):
                found.append((module, param_name))
    return found


def _remove(model: nn.Module, tensors: dict[str, ClusteredTensor]) -> None:
    """Remove the DKM parametrizations of ``tensors`` and of their tied owners; every owner
    gets the original Parameter back (the tie holds)."""
    for module, param_name in _tied_owners(model, set(tensors)):
        parametrize.remove_parametrizations(module, param_name, leave_parametrized=False)
    for tensor in tensors.values():
        parametrize.remove_parametrizations(
            tensor.module, tensor.param_name, leave_parametrized=False
        )


def release(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Remove the DKM parametrizations (of ``names``, or all) without snapping: every weight
    stays as trained, in full precision. For a fit that ended before clustering began."""
    _remove(model, clustered_tensors(model, names))


def set_temperature(model: nn.Module, tau: float, names: Iterable[str] | None = None) -> None:
    """Set tau on every clustered tensor (or those in ``names``), in place."""
    for tensor in clustered_tensors(model, names).values():
        tensor.parametrization.set_temperature(tau)


def set_mode(model: nn.Module, mode: Mode, names: Iterable[str] | None = None) -> None:
    """Switch every clustered tensor (or those in ``names``) to ``"soft"``, ``"hard"`` or
    ``"dense"``."""
    for tensor in clustered_tensors(model, names).values():
        tensor.parametrization.set_mode(mode)


@torch.no_grad()
def finalize(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Palette]:
    """Snap every clustered weight to its nearest centroid and remove the parametrizations.

    Afterwards ``model`` is a plain model of its own class whose clustered weights hold at most
    ``2**bits`` distinct values (vectors) per palette; each original ``Parameter`` keeps its
    identity. ``names`` limits it to some clustered tensors. Returns the palettes by qualified
    parameter name; ``palette.weight()`` equals the model's weight bit for bit. The model also
    carries them (:func:`~lightning_dkm.model.carried.carry_palettes`), so ``save_compressed(model,
    path)`` and ``export_coreml`` need nothing else.
    """
    tensors = clustered_tensors(model, names)
    # Every palette first: a tensor whose centroids were never initialised raises here, before
    # any parametrization is removed, so the model is left as it was.
    palettes = {name: t.parametrization.palette(t.original) for name, t in tensors.items()}
    _remove(model, tensors)
    for name, tensor in tensors.items():
        getattr(tensor.module, tensor.param_name).copy_(palettes[name].weight())
    carry_palettes(model, palettes)
    return palettes


_ORIGINAL_SUFFIX = ".original"
_PARAMETRIZATIONS = "parametrizations."


def snap_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Turn the DKM entries of a mid-training ``state_dict`` into plain, snapped weights, in place.

    A checkpoint written during DKM stores ``<module>.parametrizations.<name>.original`` and the
    parametrization's buffers; a finalized model expects ``<module>.<name>``. For each such
    entry whose module exists in ``model`` *unparametrized* this writes the weight as finalize
    would have made it from that checkpoint (every weight snapped to its nearest centroid) and
    drops the DKM keys. A further owner of a tied weight (no centroids of its own) gets the
    snapped tensor of the owner it shares storage with. Entries of modules that are parametrized
    again (DKM re-attached for another fit) are left alone: that model expects them as they are.
    Returns the converted parameter names.
    """
    modules = dict(model.named_modules())
    converted: list[str] = []
    snapped_by_storage: dict[int, torch.Tensor] = {}
    ties: list[tuple[str, str, str]] = []  # (key, head, param_name) of tied owners
    for key in [k for k in state_dict if k.endswith(_ORIGINAL_SUFFIX)]:
        if not key.startswith(prefix):
            continue
        head, sep, param_name = key[len(prefix) : -len(_ORIGINAL_SUFFIX)].rpartition(
            _PARAMETRIZATIONS
        )
        module_name = head.removesuffix(".")
        centroids_key = f"{prefix}{head}{_PARAMETRIZATIONS}{param_name}.0.centroids"
        module = modules.get(module_name)
        if not sep or module is None or parametrize.is_parametrized(module, param_name):
            continue
        if centroids_key not in state_dict:
            ties.append((key, head, param_name))
            continue
        buffer_prefix = f"{prefix}{head}{_PARAMETRIZATIONS}{param_name}.0."
        scale = state_dict.get(buffer_prefix + "scale")
        layout = _layout_from_checkpoint(
            module, module_name, param_name, state_dict[key], state_dict[centroids_key],
            per_channel_scale=scale is not None,
        )
        if layout is None:
            continue
        weight = state_dict[key]
        idx, _ = hard_assign(layout.to_palettes(weight, scale), state_dict[centroids_key])
        palette = Palette(state_dict[centroids_key].to(weight.dtype), idx, layout,
                          scale=None if scale is None else scale.to(weight.dtype))
        for stale in [k for k in state_dict if k.startswith(buffer_prefix)] + [key]:
            del state_dict[stale]
        snapped = palette.weight()
        snapped_by_storage[_storage_of(weight)] = snapped
        state_dict[f"{prefix}{head}{param_name}"] = snapped
        # what a finalized model carries about this palette (lightning_dkm.model.carried)
        carried = set(dict(module.named_buffers(recurse=False)))
        for key, value in metadata_entries(palette, f"{prefix}{head}").items():
            if key.rpartition(".")[2] in carried:
                state_dict[key] = value.to(weight.device)
        converted.append(f"{head}{param_name}")
    version = version_key(prefix)
    if converted and version not in state_dict and version.removeprefix(prefix) in dict(
        model.named_buffers(recurse=False)
    ):
        state_dict[version] = torch.tensor(1)
    for key, head, param_name in ties:
        snapped = snapped_by_storage.get(_storage_of(state_dict[key]))
        if snapped is None:
            continue
        del state_dict[key]
        state_dict[f"{prefix}{head}{param_name}"] = snapped
        converted.append(f"{head}{param_name}")
    return converted


def _storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _layout_from_checkpoint(module, module_name, param_name, weight, centroids,
                            per_channel_scale=False):
    axes = {name: (g, v) for name, g, v in clusterable_parameters(module)}
    if param_name not in axes or centroids.dim() != 3:
        return None
    group_axis, vector_axis = axes[param_name]
    P, k, d = centroids.shape
    bits = k.bit_length() - 1
    group_size = None if P == 1 else weight.shape[group_axis] // P
    spec = ClusterSpec(bits=bits, cluster_dim=d, group_size=group_size,
                       per_channel_scale=per_channel_scale)
    name = f"{module_name}.{param_name}" if module_name else param_name
    return PaletteLayout(tuple(weight.shape), spec, group_axis, vector_axis, name=name)


_SNAP_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def snap_on_load(model: nn.Module) -> None:
    """Let ``model`` (finalized) load mid-DKM checkpoints: its ``load_state_dict`` then converts
    DKM entries with :func:`snap_state_dict` first. Registering twice has no further effect."""
    if model in _SNAP_HOOKS:
        return

    def hook(module, state_dict, prefix, *args) -> None:
        snap_state_dict(module, state_dict, prefix)

    _SNAP_HOOKS[model] = register_load_pre_hook(model, hook)


def register_load_pre_hook(model: nn.Module, hook):
    """``hook(module, state_dict, prefix, ...)`` runs before ``model.load_state_dict``; returns
    the removable handle (``register_load_state_dict_pre_hook``, or its private form before
    torch 2.5)."""
    register = getattr(model, "register_load_state_dict_pre_hook", None)
    if register is not None:
        return register(hook)
    return model._register_load_state_dict_pre_hook(hook, with_module=True)


def checkpoint_clustered_names(state_dict: dict, prefix: str = "") -> list[str]:
    """The DKM-clustered parameter names a (mid-DKM) ``state_dict`` holds: each
    ``<module>.parametrizations.<name>.original`` with its ``.0.centroids`` beside it."""
    names = []
    for key in state_dict:
        if not (key.startswith(prefix) and key.endswith(_ORIGINAL_SUFFIX)):
            continue
        head, sep, param_name = key[len(prefix) : -len(_ORIGINAL_SUFFIX)].rpartition(
            _PARAMETRIZATIONS
        )
        if sep and f"{prefix}{head}{_PARAMETRIZATIONS}{param_name}.0.centroids" in state_dict:
            names.append(f"{head}{param_name}")
    return names
