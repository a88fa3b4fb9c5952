"""Model-level operations: attach DKM parametrizations to targets, find them, finalize them.

``attach`` registers a :class:`~lightning_dkm.parametrize.DKMParametrization` on each target and
initialises its centroids with seeded k-means++ (the same seed gives the same centroids in every
process). ``finalize`` snaps every clustered weight to its nearest centroid, removes the
parametrizations (the model is again a plain model of its own class, its Parameters keeping
their identity) and returns the palettes (LUT + indices) that the artifact and report use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .palette import Palette
from .parametrize import DKMParametrization, Mode, stable_seed
from .targets import Target

__all__ = ["ClusteredTensor", "attach", "clustered_tensors", "finalize", "set_mode",
           "set_temperature"]


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


def clustered_tensors(model: nn.Module) -> dict[str, ClusteredTensor]:
    """Every DKM-parametrized weight of ``model``, by qualified parameter name."""
    found: dict[str, ClusteredTensor] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, DKMParametrization):
                    name = f"{module_name}.{param_name}" if module_name else param_name
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
) -> dict[str, ClusteredTensor]:
    """Register DKM on every target of ``model`` (idempotent: an already clustered tensor is
    left as it is) and return all clustered tensors.

    Each tensor's k-means++ seed is :func:`~lightning_dkm.parametrize.stable_seed` of ``seed``
    and its name, so centroids do not depend on the order or number of processes.
    """
    modules = dict(model.named_modules())
    existing = clustered_tensors(model)
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
        ).to(weight.device)
        if initialize:
            parametrization.initialize(weight)
        parametrize.register_parametrization(module, target.param_name, parametrization)
    return clustered_tensors(model)


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set tau on every clustered tensor (in place)."""
    for tensor in clustered_tensors(model).values():
        tensor.parametrization.set_temperature(tau)


def set_mode(model: nn.Module, mode: Mode) -> None:
    """Switch every clustered tensor to ``"soft"``, ``"hard"`` or ``"off"``."""
    for tensor in clustered_tensors(model).values():
        tensor.parametrization.set_mode(mode)


@torch.no_grad()
def finalize(model: nn.Module) -> dict[str, Palette]:
    """Snap every clustered weight to its nearest centroid and remove the parametrizations.

    Afterwards ``model`` is a plain model of its own class whose clustered weights hold at most
    ``2**bits`` distinct values (vectors) per palette; each original ``Parameter`` keeps its
    identity. Returns the palettes by qualified parameter name; ``palette.weight()`` equals the
    model's weight bit for bit.
    """
    palettes: dict[str, Palette] = {}
    for name, tensor in clustered_tensors(model).items():
        original = tensor.original
        palette = tensor.parametrization.palette(original)
        parametrize.remove_parametrizations(
            tensor.module, tensor.param_name, leave_parametrized=False
        )
        getattr(tensor.module, tensor.param_name).copy_(palette.weight())
        palettes[name] = palette
    return palettes
