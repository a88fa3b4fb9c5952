"""DKM as a training strategy of Apple's coreai-opt: train-time, differentiable palettization
through coreai-opt's own ``KMeansPalettizer``, registered under the key ``"lightning_dkm"``
(:data:`STRATEGY_KEY`) that a config names::

    PalettizationSpec(n_bits=4, training_strategy_spec={"type": "lightning_dkm"})

``docs/coreai_opt.md`` is the full account: how coreai-opt finds the strategy (its
``coreai_opt.plugins`` entry point, :func:`lightning_dkm.integrations.register_coreai_opt`),
what differs from coreai-opt's own k-means, what is refused (a quantized LUT, detected sparsity)
and which attributes of coreai-opt's private fake-palettize module are read (hence the pin below
0.5, and ``tests/test_coreai_opt_plugin.py`` checking each of them).

``KMeansPalettizer.prepare`` builds one :class:`DKMTrainingStrategy` per palettized weight
(:meth:`DKMTrainingSpec.build_strategy`) and seeds ``module.centroids`` ``(P, k, d)`` with its
k-means. In training mode every read of the weight calls ``strategy.train_forward(module,
weight)``, which

1. cuts the weight into coreai-opt's own palettes, ``module.vectorize(weight)`` -> ``(P, n, d)``
   (its granularity, its vectors along the output channels, its per-channel scales);
2. runs lightning_dkm's DKM step on them: a :class:`~lightning_dkm.engine.parametrization.
   DKMParametrization` (mode ``"soft"``) over a :class:`~lightning_dkm.engine.layout.
   PaletteLayout` of shape ``(P, n, d)`` whose palettes are exactly coreai-opt's, started from
   ``module.centroids``;
3. writes the step's state back where coreai-opt keeps it: the moved centroids into
   ``module.centroids`` (in place, in its dtype: the LUT it exports) and each vector's nearest
   centroid into ``module.indices`` (uint8, on the CPU, in coreai-opt's index layout);
4. returns the soft weights in the weight's shape, ``module.devectorize(soft)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from coreai_opt.palettization.spec import TrainingStrategy, TrainingStrategySpec
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..engine.layout import ClusterSpec, PaletteLayout
from ..engine.numerics import hard_assign
from ..engine.parametrization import DKMParametrization
from ..engine.weighted import check_gradient

__all__ = ["STRATEGY_KEY", "DKMTrainingSpec", "DKMTrainingStrategy"]

#: The key of the strategy in coreai-opt's ``TrainingStrategySpec`` registry: the ``"type"`` a
#: config names (``training_strategy_spec={"type": "lightning_dkm", ...}``).
STRATEGY_KEY = "lightning_dkm"

_Implementation = Literal["auto", "chunked", "unique", "reference"]
_Gradient = Literal["unrolled", "implicit"]


class DKMTrainingStrategy(TrainingStrategy):
    """lightning_dkm's DKM step as coreai-opt's training-time forward of one palettized weight.

    Built by :meth:`DKMTrainingSpec.build_strategy` (one per weight) from the spec's fields,
    validated there and with their defaults there; they mean what they mean in
    :class:`~lightning_dkm.engine.parametrization.DKMParametrization`.

    After a training forward :attr:`parametrization` holds the DKM state of the weight (its
    ``centroids`` are the LUT, in float32) and :attr:`assignment` ``(P, n)`` each vector's
    nearest centroid: what ``module.centroids`` and ``module.indices`` hold in coreai-opt's
    layout.
    """

    def __init__(
        self,
        *,
        temperature: float,
        max_iter: int,
        epsilon: float,
        implementation: _Implementation,
        gradient: _Gradient,
    ) -> None:
        self.temperature = temperature
        self.max_iter = max_iter
        self.epsilon = epsilon
        self.implementation = implementation
        self.gradient = gradient
        #: The engine's parametrization of this weight's palettes, built at the first training
        #: forward (``None`` before).
        self.parametrization: DKMParametrization | None = None
        #: Each vector's nearest centroid ``(P, n)`` after the last training forward.
        self.assignment: Tensor | None = None

    def train_forward(self, module: nn.Module, weight: Tensor) -> Tensor:
        """One DKM step on ``weight`` (module docstring, steps 1-4): the soft weights, with the
        moved centroids and the hard assignment left in ``module.centroids`` / ``.indices``."""
        _check_supported(module)
        vectors, context = module.vectorize(weight)
        dkm = self._parametrization_for(module, vectors)
        with torch.no_grad():
            # coreai-opt's centroids are the state: they may have been re-seeded (a PATSchedule
            # that enables palettization late) or loaded from a checkpoint since the last step.
            dkm.centroids.copy_(module.centroids)
        soft = dkm(vectors)
        self._write_back(module, dkm, vectors.detach(), context)
        return module.devectorize(soft, context)

    def _parametrization_for(self, module: nn.Module, vectors: Tensor) -> DKMParametrization:
        """The engine's parametrization of the palettes ``vectors`` ``(P, n, d)``: a layout of
        that shape, one palette per index of axis 0 and vectors along axis 2, so that its
        palettes are coreai-opt's one for one. Built once, on the vectors' device."""
        P, n, d = vectors.shape
        dkm = self.parametrization
        if dkm is None or dkm.layout.shape != (P, n, d):
            name = getattr(module, "tensor_fqn", None) or "weight"
            spec = ClusterSpec(bits=int(module.n_bits), cluster_dim=d,
                               group_size=1 if P > 1 else None)
            layout = PaletteLayout((P, n, d), spec, group_axis=0, vector_axis=2, name=name)
            dkm = DKMParametrization(
                layout, temperature=self.temperature, max_iter=self.max_iter,
                epsilon=self.epsilon, implementation=self.implementation, gradient=self.gradient,
            )
            dkm.set_centroids(module.centroids.detach().float().cpu())
            self.parametrization = dkm
        if dkm.centroids.device != vectors.device:
            dkm.to(vectors.device)
        dkm.train()
        return dkm

    @torch.no_grad()
    def _write_back(self, module: nn.Module, dkm: DKMParametrization, vectors: Tensor,
                    context: object) -> None:
        """The step's state into coreai-opt's buffers: the centroids (in their dtype: the LUT
        it exports), then each vector's nearest of those centroids as ``module.indices``."""
        module.centroids.copy_(dkm.centroids)
        idx, _ = hard_assign(vectors, module.centroids)
        self.assignment = idx
        module.indices = _module_indices(module, idx, vectors, context)


def _module_indices(module: nn.Module, idx: Tensor, vectors: Tensor, context: object) -> Tensor:
    """The assignment ``idx`` ``(P, n)`` in coreai-opt's index layout: the weight's shape with
    axis 0 divided by ``cluster_dim`` (its vectors run along axis 0), uint8, on the CPU.

    ``module.devectorize`` is the only map from coreai-opt's palettes back to the weight's
    layout, and it multiplies by the per-channel scales and casts to the weight's dtype, which
    would corrupt index values. So the index is sent through it one bit at a time: bit ``j`` of
    every vector's index, as 0 or 1 in all ``d`` places, comes back as 0 or (a nonzero scale)
    times 1, and ``!= 0`` recovers it whatever the scale and dtype. Every ``d``-th row of axis 0
    is then one vector's index.
    """
    d = vectors.shape[-1]
    bits = int(module.n_bits)
    total = None
    for j in range(bits):
        plane = ((idx >> j) & 1).to(vectors.dtype).unsqueeze(-1).expand(vectors.shape)
        dense = module.devectorize(plane.contiguous(), context) != 0
        part = dense.to(torch.int32) << j
        total = part if total is None else total | part
    indices = total[::d] if d > 1 else total
    return indices.to(torch.uint8).cpu()


def _check_supported(module: nn.Module) -> None:
    """Refuse what the DKM strategy does not train faithfully (``docs/coreai_opt.md``)."""
    name = getattr(module, "tensor_fqn", None) or "a palettized weight"
    if not (hasattr(module, "vectorize") and hasattr(module, "devectorize")):
        raise TypeError(
            f"{name}: the {STRATEGY_KEY!r} training strategy needs coreai-opt's k-means "
            f"fake-palettize module (vectorize / devectorize, coreai-opt 0.4); got "
            f"{type(module).__name__}. Use it with KMeansPalettizer and coreai-opt>=0.4,<0.5"
        )
    if getattr(module, "lut_qspec", None) is not None:
        raise ValueError(
            f"{name}: the {STRATEGY_KEY!r} training strategy does not fake-quantize the LUT, so "
            f"lut_qspec={module.lut_qspec!r} would ship centroids that training never saw; set "
            f"lut_qspec=None in this weight's PalettizationSpec (or use the 'default' strategy)"
        )
    if getattr(module, "sparsity_detection_threshold", None) is not None:
        raise ValueError(
            f"{name}: the {STRATEGY_KEY!r} training strategy clusters every element, but "
            f"sparsity_detection_threshold={module.sparsity_detection_threshold} asks coreai-opt "
            f"to palettize only the nonzeros; set sparsity_detection_threshold=None in this "
            f"weight's PalettizationSpec (or use the 'default' strategy)"
        )


@TrainingStrategySpec.register(STRATEGY_KEY)
class DKMTrainingSpec(TrainingStrategySpec):
    """Settings of the ``"lightning_dkm"`` training strategy (DKM, differentiable k-means).

    Args:
        temperature: the softmax temperature tau (> 0), in units of each palette's weight
            variance (the engine normalises every palette first), so one value means the same
            at every weight scale. Smaller is closer to hard assignment. Fixed for the run:
            coreai-opt tells a strategy nothing of its step count (lightning_dkm's
            ``DKMCallback`` anneals it). Default 1e-2, as :func:`lightning_dkm.attach`.
        max_iter: DKM centroid updates per training forward (the paper and coremltools: 3).
        epsilon: stop the updates early once no centroid moves more than this (in weight
            standard deviations); 0 always runs ``max_iter``. Default 1e-4.
        implementation: the engine's DKM step: ``"auto"`` (default; per tensor, the fastest),
            ``"unique"`` (scalar palettes: DKM on the distinct float16 values), ``"chunked"``
            or ``"reference"`` (plain autograd); see ``docs/architecture.md``.
        gradient: ``"unrolled"`` (default: through every update) or ``"implicit"`` (at the
            fixed point; not with ``"reference"``).

    Example (``KMeansPalettizerConfig.from_dict`` / ``from_yaml`` take the same mapping)::

        PalettizationSpec(n_bits=4, training_strategy_spec={
            "type": "lightning_dkm", "temperature": 1e-2, "max_iter": 3})
    """

    temperature: float = Field(default=1e-2, gt=0, allow_inf_nan=False)
    max_iter: int = Field(default=3, ge=1)
    epsilon: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    implementation: _Implementation = "auto"
    gradient: _Gradient = "unrolled"

    _strategy_cls = DKMTrainingStrategy

    @model_validator(mode="after")
    def _check_gradient(self) -> DKMTrainingSpec:
        check_gradient(self.gradient, self.implementation, "DKMTrainingSpec")
        return self
