r"""Checkpoints that load anywhere: a clustered model's state as the plain model's ``state_dict``
plus its *DKM state*.

During DKM a model's ``state_dict`` holds, for every clustered weight ``<module>.<name>``, the
keys of :mod:`torch.nn.utils.parametrize`: ``<module>.parametrizations.<name>.original`` (the
trainable weight) and the :class:`~lightning_dkm.engine.parametrization.DKMParametrization`'s
buffers ``<module>.parametrizations.<name>.0.centroids``, ``.0.temperature``, ``.0.initialized``
(and ``.0.scale`` with ``per_channel_scale``); each further owner of a tied weight has its own
``<owner>.parametrizations.<name>.original``. A finalized model holds plain weights and the
``_COREML_`` buffers of the palettes it carries (:mod:`lightning_dkm.model.carried`). Neither
loads strictly into a plain instance of the model's class.

:func:`split_dkm_state` separates the two parts, as Lightning's ``ModelPruning`` saves plain
weights:

* the **plain state dict**: what the plain model loads with a strict ``load_state_dict``. Every
  clustered weight is under its plain name (and under each tied owner's), snapped to its current
  centroids, as :func:`~lightning_dkm.model.attach.finalize` would make it now; a weight whose
  centroids were never seeded (DKM has not started) is the weight as trained. No DKM key and no
  ``_COREML_`` buffer is left in it.
* the **DKM state**: the removed entries under their own keys, i.e. everything an exact resume
  needs beyond the plain weights (the originals, the centroids, tau, the scales, the seeded
  flag), and the removed ``_COREML_`` buffers. Tensors and primitives only, so it loads with
  ``torch.load(weights_only=True)``::

      {"format": 1,
       "tensors": {"<clustered name>": {"keys": [<plain key of each owner>],
                                        "entries": {<removed state_dict key>: tensor}}},
       "carried": {<removed _COREML_ key>: tensor}}

:func:`join_dkm_state` is the inverse, a pure ``dict`` operation: the state dict the
parametrized (or finalized) model loads strictly. Reading a checkpoint into a live model goes in
two steps, because Lightning loads the model's weights before any callback state:
:func:`prepare_plain_load` (a ``load_state_dict`` pre-hook) makes the plain state dict loadable
into a parametrized or finalized model, with the model's own values as placeholders for the DKM
entries, and :func:`restore_dkm_state` then writes the DKM state in. The originals are copied
into the same ``Parameter`` objects (parametrize keeps their identity), so an optimizer built
before the load, and the optimizer state restored after it, stay attached to them.

A state dict that holds the DKM keys itself (a weights-only checkpoint, ``state_dict()`` of a
parametrized model) loads into a finalized model
snapped with :mod:`lightning_dkm.model.snapping`. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .attach import ClusteredTensor, clustered_tensors, tied_owners
from .carried import (
    carried_key,
    carried_names,
    carry_palettes,
    discard_palettes,
    version_key,
)
from .snapping import palette_from_entries
from .state import (
    PARAMETRIZATIONS,
    is_compression_metadata,
    parametrization_prefix,
    qualified_name,
    split_name,
)

__all__ = [
    "DKM_STATE_FORMAT",
    "PlainLoad",
    "join_dkm_state",
    "prepare_plain_load",
    "restore_dkm_state",
    "split_dkm_state",
]

#: Version of the DKM state's layout (module docstring).
DKM_STATE_FORMAT = 1


def _owners(model: nn.Module, tensors: Mapping[str, ClusteredTensor]) -> dict[str, list[str]]:
    """Each clustered tensor's owners (qualified parameter names), the first owner (the one
    with the DKM parametrization) first, then its tied owners."""
    owners = {name: [name] for name in tensors}
    for owner, module_name, param_name in tied_owners(model, set(tensors)):
        owners[owner].append(qualified_name(module_name, param_name))
    return owners


def _carried_keys(state_dict: Mapping[str, Any], name: str) -> list[str]:
    start = carried_key(name)
    return [k for k in state_dict if k.startswith(start) and is_compression_metadata(k)]


def _has_per_tensor_metadata(state_dict: Mapping[str, Any]) -> bool:
    return any(is_compression_metadata(k) and k.count("/") == 2 for k in state_dict)


def split_dkm_state(
    model: nn.Module,
    state_dict: Mapping[str, Any] | None = None,
    names: Iterable[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(plain state dict, DKM state)`` of ``model`` (module docstring).

    Args:
        model: a model during DKM (parametrized) or finalized (carrying palettes).
        state_dict: its ``state_dict()`` (by default taken now); it is not modified, and the
            plain state dict keeps its order with each clustered weight in place of its
            original.
        names: only these clustered tensors (default: every DKM-clustered or carried one), as
            one of several callbacks does for its own.

    Raises:
        ValueError: ``state_dict`` lacks the original of a clustered tensor of ``model``: it is
            not this model's state dict.
    """
    state = dict(model.state_dict() if state_dict is None else state_dict)
    wanted = None if names is None else list(names)
    tensors = clustered_tensors(model, wanted)
    moved: dict[str, str] = {}  # removed key -> clustered name
    plain_at: dict[str, tuple[str, Tensor]] = {}  # an owner's original key -> (plain key, value)
    dkm_tensors: dict[str, Any] = {}
    for name, owners in _owners(model, tensors).items():
        original_key = parametrization_prefix(name) + "original"
        if original_key not in state:
            raise ValueError(
                f"{name}: the state_dict has no {original_key!r}; pass this model's own "
                "state_dict (model.state_dict())"
            )
        # what finalize would make of the original now: snapped, or as trained if never seeded
        original, parametrization = state[original_key], tensors[name].parametrization
        plain = (parametrization.palette(original).weight() if parametrization.is_initialized
                 else original)
        entries: dict[str, Tensor] = {}
        for owner in owners:
            base = parametrization_prefix(owner)
            for key in [k for k in state if k.startswith(base)]:
                entries[key] = state[key]
                moved[key] = name
            plain_at[f"{base}original"] = (owner, plain)
        dkm_tensors[name] = {"keys": owners, "entries": entries}
    carried_for = [n for n in carried_names(model) if wanted is None or n in wanted]
    carried = {key: state[key] for n in carried_for for key in _carried_keys(state, n)}
    plain_state: dict[str, Any] = {}
    for key, value in state.items():
        if key in plain_at:
            plain_key, plain = plain_at[key]
            plain_state[plain_key] = plain
        elif key not in moved and key not in carried:
            plain_state[key] = value
    version = version_key()
    if carried and version in plain_state and not _has_per_tensor_metadata(plain_state):
        carried[version] = plain_state.pop(version)
    return plain_state, {"format": DKM_STATE_FORMAT, "tensors": dkm_tensors, "carried": carried}


def _check_format(dkm_state: Mapping[str, Any]) -> None:
    if not isinstance(dkm_state, Mapping) or dkm_state.get("format") != DKM_STATE_FORMAT:
        found = dkm_state.get("format") if isinstance(dkm_state, Mapping) else dkm_state
        raise ValueError(
            f"not a DKM state of format {DKM_STATE_FORMAT} (from split_dkm_state); got "
            f"format {found!r}"
        )


def join_dkm_state(state_dict: Mapping[str, Any], dkm_state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_dkm_state`: the state dict of the parametrized (or finalized)
    model that both parts came from, which it loads strictly. A new ``dict``; no tensor is
    copied. E.g. outside Lightning, into a model with DKM attached::

        checkpoint = torch.load("last.ckpt", weights_only=True)
        dkm_state = checkpoint["callbacks"][callback.state_key]["model"]
        model.load_state_dict(join_dkm_state(checkpoint["state_dict"], dkm_state))
    """
    _check_format(dkm_state)
    joined = dict(state_dict)
    for tensor in dkm_state["tensors"].values():
        for key in tensor["keys"]:
            joined.pop(key, None)
        joined.update(tensor["entries"])
    joined.update(dkm_state["carried"])
    return joined


class PlainLoad(NamedTuple):
    """What :func:`prepare_plain_load` did: the clustered tensors whose DKM entries are now
    placeholders (``parametrized``) and the finalized tensors whose carried palette it dropped
    (``carried``); :func:`restore_dkm_state` fills both in."""

    parametrized: list[str]
    carried: list[str]


def prepare_plain_load(
    model: nn.Module,
    state_dict: dict[str, Any],
    names: Iterable[str] | None = None,
) -> PlainLoad:
    """Make a plain ``state_dict`` (from :func:`split_dkm_state`) strictly loadable into
    ``model`` as it is now, in place; the body of a ``load_state_dict`` pre-hook.

    * A clustered tensor of ``model`` (parametrized) whose plain weight is in ``state_dict``
      and whose DKM entries are not: its plain key (and its tied owners') is dropped and its DKM
      entries are set to the model's own current values, placeholders that the load copies onto
      themselves; :func:`restore_dkm_state` must then write the checkpoint's DKM state. A
      ``_COREML_`` entry of a parametrized tensor (a stale palette) is dropped.
    * A finalized tensor whose weight is in ``state_dict`` without its ``_COREML_`` entries:
      the model's carried palette no longer describes the incoming weight, so it is discarded;
      :func:`restore_dkm_state` records the checkpoint's.

    A state dict that holds the DKM keys itself (``...parametrizations...original``) is left
    as it is. ``names`` limits this to some tensors.
    """
    wanted = None if names is None else list(names)
    tensors = clustered_tensors(model, wanted)
    modules = dict(model.named_modules())
    parametrized: list[str] = []
    for name, owners in _owners(model, tensors).items():
        for stale in _carried_keys(state_dict, name):
            del state_dict[stale]
        if parametrization_prefix(name) + "original" in state_dict or name not in state_dict:
            continue
        for owner in owners:
            state_dict.pop(owner, None)
            owner_module, owner_param = split_name(owner)
            plist = modules[owner_module].parametrizations[owner_param]
            state_dict.update(plist.state_dict(prefix=parametrization_prefix(owner)))
        parametrized.append(name)
    carried: list[str] = []
    for name in carried_names(model):
        if (wanted is not None and name not in wanted) or name in tensors:
            continue
        if name in state_dict and carried_key(name, "lut") not in state_dict:
            discard_palettes(model, [name])
            carried.append(name)
    # The version buffer (always 1) goes with the per-tensor buffers: a placeholder where the
    # model has it and the state does not; where the state has it and the model does not, the
    # model gets one if the state carries palettes, else the state's entry goes.
    version = version_key()
    if version in model._buffers and version not in state_dict:
        state_dict[version] = model._buffers[version]
    elif version not in model._buffers and version in state_dict:
        if _has_per_tensor_metadata(state_dict):
            model.register_buffer(version, torch.tensor(1))
        else:
            del state_dict[version]
    return PlainLoad(parametrized, carried)


def restore_dkm_state(
    model: nn.Module, dkm_state: Mapping[str, Any], names: Iterable[str] | None = None
) -> list[str]:
    """Write a DKM state (from :func:`split_dkm_state`) into ``model``, whose plain weights are
    already loaded; returns the names restored.

    Into a clustered tensor (parametrized): its entries, loaded into each owner's
    ``ParametrizationList`` (the original is copied into the same ``Parameter``). Into a
    finalized tensor: the palette it carries, from the checkpoint's centroids and original (the
    palette of the snapped weight that the plain state dict holds). The carried ``_COREML_``
    buffers of a finalized checkpoint are registered again. ``names`` limits this to some
    tensors.

    Raises:
        ValueError: a DKM state of another format, or a tensor ``model`` does not have.
    """
    _check_format(dkm_state)
    wanted = None if names is None else set(names)
    tensors = clustered_tensors(model)
    restored: list[str] = []
    for name, tensor in dkm_state["tensors"].items():
        if wanted is not None and name not in wanted:
            continue
        if name in tensors:
            _load_entries(model, name, tensor["entries"])
        else:
            _require_weight(model, name)
            palette = palette_from_entries(model, name, tensor["entries"])
            if palette is not None:
                carry_palettes(model, {name: palette})
        restored.append(name)
    carried = {
        key: value for key, value in dkm_state["carried"].items()
        if wanted is None or key == version_key()
        or any(key.startswith(carried_key(n)) for n in wanted)
    }
    if any(key != version_key() for key in carried):
        for key, value in carried.items():
            module_name, _, buffer = key.rpartition(".")
            module = model.get_submodule(module_name)
            old = module._buffers.get(buffer)
            device = old.device if old is not None else _device_of(module, value)
            module.register_buffer(buffer, value.to(device, copy=True))
        restored += [n for n in carried_names(model)
                     if n not in restored and _carried_keys(carried, n)]
    return restored


def _require_weight(model: nn.Module, name: str) -> None:
    module_name, param_name = split_name(name)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if not isinstance(getattr(module, param_name, None), Tensor):
        raise ValueError(f"{name}: the DKM state clusters a weight that the model does not have")


def _device_of(module: nn.Module, default: Tensor) -> torch.device:
    first = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None)
    return default.device if first is None else first.device


def _load_entries(model: nn.Module, name: str, entries: Mapping[str, Tensor]) -> None:
    """Load a clustered tensor's entries into each of its owners' ``ParametrizationList``."""
    by_owner: dict[str, dict[str, Tensor]] = {}
    for key, value in entries.items():
        head, sep, rest = key.partition(PARAMETRIZATIONS)
        param_name, _, local = rest.partition(".")
        if not sep or not local:
            raise ValueError(f"{name}: {key!r} is not a parametrization entry")
        by_owner.setdefault(head + param_name, {})[local] = value
    for owner, local_entries in by_owner.items():
        module_name, param_name = split_name(owner)
        try:
            module = model.get_submodule(module_name)
            plist = module.parametrizations[param_name]
        except (AttributeError, KeyError) as err:
            raise ValueError(
                f"{name}: the model has no parametrization "
                f"{parametrization_prefix(owner)[:-1]!r} to restore into"
            ) from err
        plist.load_state_dict(local_entries, strict=True)
