"""Model-level operations: attach DKM parametrizations to targets, find them, finalize them.

``attach`` registers a :class:`~lightning_dkm.engine.parametrization.DKMParametrization` on each
target and initialises its centroids with seeded k-means++ (the same seed gives the same
centroids in every process). ``finalize`` snaps every clustered weight to its nearest centroid,
removes the parametrizations (the model is again a plain model of its own class, its Parameters
keeping their identity) and returns the palettes (LUT + indices) that the artifact and report
use. How a parametrized or finalized model is written to and read from checkpoints is
:mod:`lightning_dkm.model.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..engine.palette import Palette
from ..engine.parametrization import (
    DKMParametrization,
    Implementation,
    Mode,
    initialize_many,
    stable_seed,
)
from ..engine.sharding import full_tensor, write_full
from ..engine.weighted import Gradient
from .carried import carry_palettes, discard_palettes
from .state import qualified_name
from .targets import Target
from .tied import TiedWeight

__all__ = [
    "ClusteredTensor",
    "attach",
    "clustered_tensors",
    "finalize",
    "finalize_sharded",
    "release",
    "set_mode",
    "set_temperature",
    "tied_owners",
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

    def full_original(self) -> Tensor:
        """The whole original, detached: gathered from every rank when FSDP2 shards it (a
        collective, :func:`~lightning_dkm.engine.sharding.full_tensor`), else the Parameter's
        own data."""
        return full_tensor(self.original)


def clustered_tensors(
    model: nn.Module, names: Iterable[str] | None = None
) -> dict[str, ClusteredTensor]:
    """Every DKM-parametrized weight of ``model`` (or those named in ``names``), by qualified
    parameter name."""
    wanted = None if names is None else set(names)
    found: dict[str, ClusteredTensor] = {}
    for module_name, module, param_name, p in _parametrizations(model, DKMParametrization):
        name = qualified_name(module_name, param_name)
        if wanted is None or name in wanted:
            found[name] = ClusteredTensor(name, module, param_name, p)
    return found


def _parametrizations(model: nn.Module, kind: type):
    """``(module name, module, parameter name, parametrization)`` of every parametrization of
    type ``kind`` registered in ``model``."""
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for param_name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, kind):
                        yield module_name, module, param_name, p


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

    Each tensor's k-means++ seed (vector palettes) is
    :func:`~lightning_dkm.engine.parametrization.stable_seed` of ``seed`` and its name, so
    centroids do not depend on the order or number of processes.
    """
    modules = dict(model.named_modules())
    existing = clustered_tensors(model)
    # A finalized model clustered again: the palettes it carries describe the old weights.
    discard_palettes(model, [t.name for t in targets if t.name not in existing])
    new: list[tuple[Target, nn.Module, DKMParametrization, Tensor]] = []
    for target in targets:
        if target.name in existing:
            continue
        module = modules[target.module_name]
        weight = getattr(module, target.param_name)
        target.layout.check(weight)
        new.append((target, module, DKMParametrization(
            target.layout,
            temperature=temperature,
            max_iter=max_iter,
            epsilon=epsilon,
            seed=stable_seed(seed, target.name),
            mode=mode,
            implementation=implementation,
            gradient=gradient,
        ).to(weight.device), weight))
    if initialize:  # all together (one batched k-means), before any is registered
        initialize_many([(p, lambda weight=weight: weight) for _, _, p, weight in new])
    for target, module, parametrization, _ in new:
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


def tied_owners(model: nn.Module, names: set[str] | None = None) -> list[tuple[str, str, str]]:
    """``(owner name, module name, parameter name)`` of every further owner of a tied, clustered
    weight (a :class:`~lightning_dkm.model.tied.TiedWeight`) whose tensor is clustered as one of
    ``names`` (all of them for ``None``); ``owner name`` is that tensor's clustered name."""
    return [(p.owner_name, module_name, param_name)
            for module_name, _, param_name, p in _parametrizations(model, TiedWeight)
            if names is None or p.owner_name in names]


def _remove(model: nn.Module, tensors: dict[str, ClusteredTensor]) -> None:
    """Remove the DKM parametrizations of ``tensors`` and of their tied owners; every owner
    gets the original Parameter back (the tie holds)."""
    for _, module_name, param_name in tied_owners(model, set(tensors)):
        parametrize.remove_parametrizations(
            model.get_submodule(module_name), param_name, leave_parametrized=False
        )
    for tensor in tensors.values():
        parametrize.remove_parametrizations(
            tensor.module, tensor.param_name, leave_parametrized=False
        )


def release(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Remove the DKM parametrizations (of ``names``, or all) without snapping: every weight
    stays as trained, in full precision. For a fit that ended before clustering began, or for
    a model an earlier fit left clustered (``finalize=False``, or a fit that raised) that a new
    :class:`~lightning_dkm.DKMCallback` is to fit again from its trained weights."""
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


@torch.no_grad()
def finalize_sharded(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Palette]:
    """:func:`finalize` for a model whose weights FSDP2 shards (``fully_shard``): every rank
    gathers each clustered weight in turn (a collective; call it on every rank), takes its palette
    and writes the snapped values back into its own shard. The parametrizations stay (FSDP2 owns
    the parameters they hold; removing them would detach the weights from FSDP) in mode
    ``"dense"``, which returns the snapped weight as it is, so the sharded model computes exactly
    what the finalized plain model does. Returns the palettes, the same on every rank; the plain
    model is built from them and the full state dict (see ``DKMCallback``).
    """
    tensors = clustered_tensors(model, names)
    # every palette first, as in finalize
    palettes = {name: t.parametrization.palette(t.full_original()) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        write_full(tensor.original, palettes[name].weight())
        tensor.parametrization.set_mode("dense")
    return palettes
