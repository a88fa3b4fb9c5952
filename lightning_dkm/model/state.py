"""The tensors a model's ``state_dict`` holds, each stored tensor once.

Tied weights (one Parameter reachable under two names, e.g. an embedding shared with the output
layer) appear in ``state_dict`` under every name. The report counts them once and the artifact
stores them once, so both use :func:`state_tensors`: the first name (or a preferred one, such as
the name a palette was made for) is canonical and the others become aliases of it. Two entries
are the same tensor when they are the same view of the same memory (data pointer, dtype, shape
and strides; on the ``meta`` device the same tensor object); empty tensors are never merged
(:func:`tensor_identity`, which :func:`~lightning_dkm.model.targets.select_targets` and
:func:`~lightning_dkm.export.artifact.load_compressed` use too).

It is also the one home of how ``state_dict`` keys are spelled: a module's prefix and the keys of
:mod:`torch.nn.utils.parametrize` (``<module>.parametrizations.<param>.original`` and
``... .0.<buffer>``), which checkpoints, snapping and the carried palettes all read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "COMPRESSION_METADATA_PREFIX", "PARAMETRIZATIONS", "StateTensors", "is_compression_metadata",
    "module_prefix", "parametrization_prefix", "parametrized_originals", "qualified_name",
    "split_name", "state_tensors", "tensor_identity", "unwrap",
]

#: The infix of :mod:`torch.nn.utils.parametrize`'s ``state_dict`` keys.
PARAMETRIZATIONS = "parametrizations."
_ORIGINAL = "original"


def split_name(name: str) -> tuple[str, str]:
    """``(module name, parameter name)`` of a qualified parameter name (``""`` for the root)."""
    module_name, _, param_name = name.rpartition(".")
    return module_name, param_name


def qualified_name(module_name: str, param_name: str) -> str:
    """The qualified name of ``module_name``'s parameter ``param_name``: the inverse of
    :func:`split_name`."""
    return f"{module_name}.{param_name}" if module_name else param_name


def module_prefix(module_name: str, prefix: str = "") -> str:
    """The ``state_dict`` key prefix of a module's own entries, under ``prefix``."""
    return f"{prefix}{module_name}." if module_name else prefix


def parametrization_prefix(name: str, prefix: str = "") -> str:
    """``<prefix><module>.parametrizations.<param>.``: what every ``state_dict`` key of the
    parametrizations of the parameter ``name`` starts with (``original``, ``0.centroids``,
    ...)."""
    module_name, param_name = split_name(name)
    return f"{module_prefix(module_name, prefix)}{PARAMETRIZATIONS}{param_name}."


def parametrized_originals(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{key: qualified parameter name}`` of every parametrized original
    (``<module>.parametrizations.<param>.original``) under ``prefix`` in ``state_dict``."""
    found = {}
    for key in state_dict:
        if not (key.startswith(prefix) and key.endswith("." + _ORIGINAL)):
            continue
        head, sep, param_name = key[len(prefix) : -len(_ORIGINAL) - 1].rpartition(
            PARAMETRIZATIONS
        )
        if sep and (not head or head.endswith(".")):
            found[key] = head + param_name
    return found

#: coremltools' prefix of compression-metadata buffers (``<module>._COREML_/<param>/lut``, ...):
#: the palettes a finalized model carries (:mod:`lightning_dkm.model.carried`).
COMPRESSION_METADATA_PREFIX = "_COREML_"


def is_compression_metadata(name: str) -> bool:
    """Whether ``name`` (a buffer name, or a ``state_dict`` key) is a compression-metadata
    buffer."""
    return name.rpartition(".")[2].startswith(COMPRESSION_METADATA_PREFIX + "/")


@dataclass(frozen=True)
class StateTensors:
    """``tensors``: canonical name -> tensor, in ``state_dict`` order; ``aliases``: duplicate
    name -> canonical name; ``parameters``: the names that are Parameters (not buffers);
    ``non_tensors``: ``state_dict`` entries that are not tensors (``get_extra_state``)."""

    tensors: dict[str, Tensor]
    aliases: dict[str, str]
    parameters: frozenset[str]
    non_tensors: tuple[str, ...]


def tensor_identity(t: Tensor) -> tuple | None:
    """What makes two tensors one stored tensor (tied weights): the same view of the same
    memory (data pointer, dtype, shape, strides); on the ``meta`` device, where every data
    pointer is 0, the same tensor object (pass the model's own Parameters and buffers, not
    ``state_dict()``'s detached copies). ``None`` for an empty tensor: never merged."""
    if t.numel() == 0:
        return None
    if t.is_meta:
        return (t.device, id(t))
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and ``DistributedDataParallel`` wrappers (so its
    names are the model's own, not ``_orig_mod.``- or ``module.``-prefixed ones)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and type(model).__name__ == "DistributedDataParallel":
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def state_tensors(model: nn.Module, preferred: Iterable[str] = ()) -> StateTensors:
    """Deduplicate ``model.state_dict()``, without its compression-metadata buffers; names in
    ``preferred`` win the canonical slot."""
    state = {k: v for k, v in model.state_dict().items() if not is_compression_metadata(k)}
    own = model.state_dict(keep_vars=True)  # the tensors themselves: tied ones on meta too
    identities = {name: tensor_identity(own[name]) for name, t in state.items()
                  if isinstance(t, Tensor)}
    canonical_of: dict[tuple, str] = {}
    for name in preferred:
        ident = identities.get(name)
        if ident is not None:
            canonical_of.setdefault(ident, name)
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, ident in identities.items():
        owner = canonical_of.setdefault(ident, name) if ident is not None else name
        if owner == name:
            tensors[name] = state[name]
        else:
            aliases[name] = owner
    parameters = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))
    non_tensors = tuple(name for name, v in state.items() if not isinstance(v, Tensor))
    return StateTensors(tensors, aliases, parameters, non_tensors)
