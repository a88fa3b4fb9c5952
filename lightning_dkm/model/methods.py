r"""Train-time clustering methods that :class:`~lightning_dkm.DKMCallback` can run (``method=``).

Every method works on the same :class:`~lightning_dkm.engine.parametrization.DKMParametrization`
state (a palette layout and ``2**bits`` centroids per palette) and ends the same way: ``finalize``
snaps each weight to its nearest centroid, so the palettes, the compression report and the
artifact have one format whatever the method. They differ in what happens during training:

``"dkm"`` (default) -- Differentiable K-Means (Cho et al., ICLR 2022): the parametrization runs
    in mode ``"soft"``; the forward pass sees attention-weighted centroids and the loss gradient
    flows through the k-means iterations into the weights (:mod:`lightning_dkm.engine.numerics`).
    The temperature schedule applies; ``hard_epoch`` switches to ``"hard"`` for the last epochs.

``"hard"`` -- nearest-centroid clustering with straight-through gradients, the common baseline
    (what TensorFlow Model Optimization's weight clustering does): mode ``"hard"`` from
    ``start_epoch``. The forward pass sees every weight snapped to its nearest centroid, the
    backward pass treats the snap as the identity, and in training each centroid moves to the
    mean of its members once per forward pass (one Lloyd step).

``"deep_kmeans"`` -- Deep k-Means (Wu et al., ICML 2018): the weights train freely (mode
    ``"dense"``, the forward pass sees the real weights) under a k-means regulariser that pulls
    each weight toward the mean of its cluster; the assignments are refreshed every
    ``refresh_every`` optimizer steps; at the end the centroids are refitted to the final
    weights (the optimal k-means of scalar palettes, Lloyd for vectors) and finalize shares
    them (hard weight sharing).

The Deep k-Means regulariser
----------------------------

Take one palette: ``n`` vectors of length ``d`` (``d = cluster_dim``), the columns of
:math:`W \in R^{d \times n}`. For an assignment of the vectors to ``k`` clusters let
:math:`F \in R^{n \times k}` be the normalised indicator, :math:`F_{ij} = 1/\sqrt{n_j}` if vector
``i`` is in cluster ``j`` (of :math:`n_j` members) and 0 otherwise. :math:`P = FF^\top` is the
orthogonal projection that replaces every column by the mean of its cluster, so the k-means
objective is

.. math::

    R(W) = \|W - WFF^\top\|_F^2
         = \operatorname{Tr}(W^\top W) - \operatorname{Tr}(F^\top W^\top W F).

Wu et al. relax :math:`F` to any matrix with orthonormal columns (the "spectral relaxation";
the minimising :math:`F` are the top-``k`` eigenvectors of :math:`W^\top W`), keep :math:`F`
fixed between refreshes and add :math:`\lambda R(W)` to the loss. With :math:`F` fixed,
:math:`\partial \operatorname{Tr}(W^\top W)/\partial W = 2W` and
:math:`\partial \operatorname{Tr}(F^\top W^\top W F)/\partial W = 2WFF^\top`, so

.. math::

    \frac{\partial R}{\partial W} = 2\,W(I - FF^\top) = 2\,(w_i - \bar w_{a(i)})_{i=1..n},

i.e. for the indicator :math:`F` each weight (vector) is pulled toward the current mean
:math:`\bar w_{a(i)}` of its cluster :math:`a(i)` (the mean is that of the *current* weights of the
fixed members, which is why :math:`R` keeps its meaning as the weights move).

**What is implemented.** :math:`F` is the discrete normalised indicator, not the relaxed
eigenvector matrix. The reason: a palette's :math:`W` has rank at most ``d = cluster_dim``
(1 for scalar clustering, at most 8 here), and whenever ``d <= k`` the top-``k`` eigenvectors of
:math:`W^\top W` span its whole row space, so :math:`WFF^\top = W` and the relaxed :math:`R` is
identically 0 at each refresh -- it would pull the weights only back toward a stale subspace,
not toward shared values. (Wu et al. cluster long sub-vectors, ``d >> k``, where the relaxation is
informative.) The indicator is exactly the solution of the unrelaxed problem, and its refresh is
the paper's alternative "hard assignment" update. So, every ``refresh_every`` optimizer steps
(and when regularisation starts) the method assigns each vector to its nearest centroid and
moves the centroids to the means of their members; at every optimizer step, once the gradients
of the loss are complete (``on_before_optimizer_step``: after gradient accumulation and AMP
unscaling, before clipping), it adds

.. math::

    \lambda\,\frac{\partial R}{\partial W} = 2\lambda\,(w_i - \bar w_{a(i)})

to the gradient of every clustered weight, :math:`\bar w` being the member means of the weights
as they are at that step and ``lambda = regularization``. :math:`R` is a sum over the palette (not
a mean), as in the paper, so ``lambda`` is "loss units per squared weight unit"; with Adam the
pull per step is bounded by the learning rate whatever its size. :func:`kmeans_regularizer`
computes :math:`R` itself (with a dense :math:`F`, for checking on small tensors) and
:func:`kmeans_regularizer_grad` the gradient above, without forming :math:`F`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..engine.kmeans import kmeans_centroids, lloyd, member_means, nearest_centroid
from ..engine.layout import is_int, is_number
from ..engine.sharding import shard_like

if TYPE_CHECKING:
    from ..engine.parametrization import Mode
    from .attach import ClusteredTensor

__all__ = [
    "DEFAULT_REFRESH_EVERY",
    "DEFAULT_REGULARIZATION",
    "METHOD_NAMES",
    "ClusteringMethod",
    "DKMMethod",
    "DeepKMeansMethod",
    "HardMethod",
    "MethodName",
    "build_method",
    "indicator_matrix",
    "kmeans_regularizer",
    "kmeans_regularizer_grad",
]

MethodName = Literal["dkm", "deep_kmeans", "hard"]
METHOD_NAMES: tuple[str, ...] = ("dkm", "deep_kmeans", "hard")
#: Default ``lambda`` of the Deep k-Means regulariser (see the module docstring).
DEFAULT_REGULARIZATION = 1e-3
#: Default number of optimizer steps between assignment refreshes for Deep k-Means.
DEFAULT_REFRESH_EVERY = 50
# Lloyd iterations at most when Deep k-Means refits vector centroids to the final weights.
_FINAL_LLOYD_ITER = 100


# -- the regulariser -------------------------------------------------------------------------------
def indicator_matrix(idx: Tensor, k: int) -> Tensor:
    """The normalised cluster indicator ``F`` (P, n, k) of an assignment ``idx`` (P, n):
    ``F[p, i, j] = 1/sqrt(n_j)`` if ``idx[p, i] == j``. ``F^T F`` is the identity on the
    non-empty clusters. Dense: for small tensors and checks."""
    onehot = torch.nn.functional.one_hot(idx, k).to(torch.float64)
    counts = onehot.sum(1, keepdim=True)
    return onehot / counts.clamp_min(1).sqrt()


def kmeans_regularizer(x: Tensor, F: Tensor) -> Tensor:
    r"""The Deep k-Means regulariser ``sum_p Tr(W^T W) - Tr(F^T W^T W F)``, differentiable in
    ``x``.

    ``x`` is ``(P, n, d)`` (each palette's ``W`` is ``x[p].T``, ``d x n``) and ``F`` is
    ``(P, n, k)`` with orthonormal (or zero) columns: the indicator from
    :func:`indicator_matrix`, or any relaxed ``F``. Forms ``W F`` (``d x k``) only, never the
    ``n x n`` Gram matrix.
    """
    W = x.transpose(1, 2)  # (P, d, n)
    WF = W @ F.to(x.dtype)  # (P, d, k)
    return W.square().sum() - WF.square().sum()


def kmeans_regularizer_grad(x: Tensor, idx: Tensor, k: int) -> Tensor:
    r"""``dR/dx = 2 (x_i - mean of x over the members of cluster idx_i)`` for the indicator ``F``
    of ``idx`` (see the module docstring), shape and dtype of ``x``; no graph is built."""
    with torch.no_grad():
        means, _ = member_means(x.to(torch.promote_types(x.dtype, torch.float32)), idx, k)
        member_mean = means.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return (2.0 * (x.to(member_mean.dtype) - member_mean)).to(x.dtype)


# -- methods ---------------------------------------------------------------------------------------
class ClusteringMethod:
    """What a method does during training; :class:`~lightning_dkm.DKMCallback` calls these
    hooks and does the rest (targets, seeding, metrics, finalize, report, artifact).

    Subclasses set ``name`` and ``uses_temperature`` and override what they need.
    """

    name: str = ""
    #: Whether the temperature schedule drives this method (only DKM's soft mode uses tau).
    uses_temperature: bool = False

    def mode_for_epoch(self, epoch: int, start_epoch: int, hard_epoch: int | None) -> Mode:
        """The parametrization mode (``"soft"``/``"hard"``/``"dense"``) for ``epoch``."""
        raise NotImplementedError

    def on_before_optimizer_step(
        self, tensors: Mapping[str, ClusteredTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Called once per optimizer step in active epochs, when the loss gradients are
        complete (after accumulation and AMP unscaling, before clipping)."""

    def before_finalize(self, tensors: Mapping[str, ClusteredTensor]) -> None:
        """Called at the end of fit, before the weights are snapped to their centroids."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DKMMethod(ClusteringMethod):
    """Differentiable K-Means: soft from ``start_epoch``, hard from ``hard_epoch`` (if given)."""

    name = "dkm"
    uses_temperature = True

    def mode_for_epoch(self, epoch: int, start_epoch: int, hard_epoch: int | None) -> Mode:
        if epoch < start_epoch:
            return "dense"
        if hard_epoch is not None and epoch >= hard_epoch:
            return "hard"
        return "soft"


class HardMethod(ClusteringMethod):
    """Nearest centroid + straight-through gradient from ``start_epoch``; centroids follow the
    means of their members (one Lloyd step per training forward)."""

    name = "hard"

    def mode_for_epoch(self, epoch: int, start_epoch: int, hard_epoch: int | None) -> Mode:
        return "dense" if epoch < start_epoch else "hard"


def _seeded_palettes(tensor: ClusteredTensor) -> Tensor:
    """The whole weight (gathered when FSDP2 shards it) as float32 palettes ``(P, n, d)``,
    its centroids seeded from it first if they never were."""
    weight = tensor.full_original()
    if not tensor.parametrization.is_initialized:
        tensor.parametrization.initialize(weight)
    return tensor.parametrization.to_palettes(weight).float()


class DeepKMeansMethod(ClusteringMethod):
    """Deep k-Means: free weights (mode ``"dense"``) plus ``regularization * dR/dW`` in their
    gradients, assignments refreshed every ``refresh_every`` optimizer steps, centroids refitted
    to the final weights before finalize (module docstring).

    Args:
        regularization: ``lambda`` (> 0).
        refresh_every: optimizer steps between assignment refreshes (>= 1).
    """

    name = "deep_kmeans"

    def __init__(
        self,
        regularization: float = DEFAULT_REGULARIZATION,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
    ) -> None:
        if not is_number(regularization) or not 0 < regularization < math.inf:
            raise ValueError(f"regularization must be a finite number > 0; got {regularization!r}")
        if not is_int(refresh_every, 1):
            raise ValueError(f"refresh_every must be an int >= 1; got {refresh_every!r}")
        self.regularization = float(regularization)
        self.refresh_every = int(refresh_every)
        #: Optimizer steps taken with the regulariser (drives the refresh period).
        self.steps = 0
        self._assignments: dict[str, Tensor] = {}

    def mode_for_epoch(self, epoch: int, start_epoch: int, hard_epoch: int | None) -> Mode:
        return "dense"

    @torch.no_grad()
    def refresh(self, tensors: Mapping[str, ClusteredTensor]) -> None:
        """Assign every vector to its nearest centroid, then move each centroid to the mean of
        its members (an empty cluster keeps its centroid): one Lloyd step."""
        for name, tensor in tensors.items():
            parametrization = tensor.parametrization
            x = _seeded_palettes(tensor)
            centroids = parametrization.centroids.float()
            idx = nearest_centroid(x, centroids)
            means, counts = member_means(x, idx, centroids.shape[1])
            new = torch.where(counts.unsqueeze(-1) > 0, means, centroids)
            parametrization.centroids.copy_(new.to(parametrization.centroids.dtype))
            self._assignments[name] = idx

    @torch.no_grad()
    def on_before_optimizer_step(
        self, tensors: Mapping[str, ClusteredTensor], optimizer: torch.optim.Optimizer
    ) -> None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        tensors = {n: t for n, t in tensors.items() if id(t.original) in owned}
        if not tensors:
            return
        if self.steps % self.refresh_every == 0 or any(n not in self._assignments for n in tensors):
            self.refresh(tensors)
        self.steps += 1
        for name, tensor in tensors.items():
            param = tensor.original
            parametrization = tensor.parametrization
            layout = parametrization.layout
            x = parametrization.to_palettes(tensor.full_original())
            idx = self._assignments[name] = self._assignments[name].to(x.device)
            grad = kmeans_regularizer_grad(x, idx, layout.spec.num_centroids)
            # d/dw of a penalty on the scaled palettes x = w / s is (d/dx) / s, per channel.
            inverse = None if parametrization.scale is None else parametrization.scale.reciprocal()
            grad = layout.from_palettes(grad.mul_(self.regularization), inverse)
            grad = shard_like(param, grad)  # this rank's part when FSDP2 shards the weight
            if param.grad is None:
                param.grad = grad.contiguous()
            else:
                param.grad.add_(grad)

    @torch.no_grad()
    def before_finalize(self, tensors: Mapping[str, ClusteredTensor]) -> None:
        """Refit the centroids to the final weights: the optimal k-means of scalar palettes
        (:func:`~lightning_dkm.engine.kmeans.kmeans_centroids`), Lloyd from the current
        centroids for vectors."""
        for tensor in tensors.values():
            parametrization = tensor.parametrization
            x = _seeded_palettes(tensor).cpu()
            if x.shape[-1] == 1:
                centroids = kmeans_centroids(x, parametrization.centroids.shape[1],
                                             name=parametrization.layout.name)
            else:
                centroids = lloyd(x, parametrization.centroids.float().cpu(),
                                  max_iter=_FINAL_LLOYD_ITER).centroids
            parametrization.centroids.copy_(centroids.to(parametrization.centroids))
        self._assignments.clear()

    def state_dict(self) -> dict[str, Any]:
        # The assignments are part of the state: a resume that refreshed them instead would move
        # the centroids (a Lloyd step) where the uninterrupted run did not. Stored as uint8
        # (k <= 256) on CPU, so a checkpoint holds one byte per clustered vector.
        return {
            "steps": self.steps,
            "assignments": {n: idx.to("cpu", torch.uint8) for n, idx in self._assignments.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self._assignments = {
            name: idx.long() for name, idx in dict(state.get("assignments", {})).items()
        }

    def __repr__(self) -> str:
        return (
            f"DeepKMeansMethod(regularization={self.regularization}, "
            f"refresh_every={self.refresh_every})"
        )


def build_method(
    method: str,
    *,
    regularization: float = DEFAULT_REGULARIZATION,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
) -> ClusteringMethod:
    """The :class:`ClusteringMethod` named ``method``, its options validated (``ValueError``
    naming the bad value)."""
    if method not in METHOD_NAMES:
        raise ValueError(f"method must be one of {METHOD_NAMES}; got {method!r}")
    # built whatever the method, so its options are checked wherever they are given
    deep_kmeans = DeepKMeansMethod(regularization=regularization, refresh_every=refresh_every)
    if method == "dkm":
        return DKMMethod()
    if method == "hard":
        return HardMethod()
    return deep_kmeans

