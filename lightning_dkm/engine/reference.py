r"""The differentiable k-means (DKM) step of Cho et al., ICLR 2022 (arXiv 2108.12659).

DKM casts k-means as attention. For the weights of one palette :math:`X \in R^{n \times d}` and
centroids :math:`C \in R^{k \times d}`, one iteration is

.. math::

    A = \operatorname{softmax}_{\text{rows}}\Big(-\frac{\|X_i - C_j\|^2}{\tau\,s^2}\Big),
    \qquad C \leftarrow \frac{A^\top X}{A^\top \mathbf 1},

repeated up to ``max_iter`` times or until no centroid moves more than ``epsilon``. The
clustered weight is :math:`\tilde X = A C` (the attention of the last iteration times the
centroids it produced). Every operation is differentiable, so the loss gradient reaches ``X``
through all iterations (the "unrolled" backward).

**How tau relates to the weights' scale.** Distances are divided by :math:`s^2`, the per-palette
variance of the weights (a constant for autograd, computed again every call), so ``tau`` is
*scale-free*: the same schedule works for an embedding with std 1 and a conv with std 0.01, and
it keeps its meaning as weights shrink or grow during training. What a value means, and how it
compares with coremltools' ``tau``: ``docs/how_dkm_works.md``, "tau and the weight variance".

This is the plain-autograd step: every iteration stays in the graph. It is the test
oracle of the weighted core (:mod:`.weighted`) that the fast steps feed, and what ``"auto"``
picks where the attention is small. The shared numerics (normalisation, early stop,
precision) live in :mod:`.numerics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import sq_distances
from .numerics import (
    EMPTY_MASS,
    MIN_TAU,
    DKMOutput,
    EarlyStop,
    Normalization,
    autocast_disabled,
    denormalized_output,
    normalized_problem,
)

__all__ = ["dkm_cluster", "soft_assignment", "update_centroids"]


def soft_assignment(xt: Tensor, cn: Tensor, tau: Tensor | float) -> Tensor:
    r""":math:`\operatorname{softmax}(-D / \tau)` over the centroids: shape ``(P, k, n)``.

    ``xt`` holds the normalised points as ``(P, d, n)``, ``cn`` the normalised centroids
    ``(P, k, d)``. Finite for every tau (:mod:`.numerics`, "Numerics"): taus below ``MIN_TAU``
    are raised to it, a tensor tau in at least float32 (a float16 buffer, ``module.half()``,
    rounds taus below ~6e-8 to 0).
    """
    if isinstance(tau, Tensor):
        tau = tau.to(torch.promote_types(tau.dtype, torch.float32)).clamp_min(MIN_TAU)
    else:
        tau = max(float(tau), MIN_TAU)
    return torch.softmax(sq_distances(xt, cn) / -tau, dim=1)


def update_centroids(attention: Tensor, xt: Tensor, previous: Tensor) -> Tensor:
    r""":math:`C = A X / A 1` from ``attention`` (P, k, n) and ``xt`` (P, d, n); clusters with
    mass below ``EMPTY_MASS`` keep ``previous`` (P, k, d)."""
    mass = attention.sum(dim=2)  # (P, k)
    weighted_sum = torch.bmm(attention, xt.transpose(1, 2))  # (P, k, d)
    updated = weighted_sum / mass.clamp_min(EMPTY_MASS).unsqueeze(-1)
    return torch.where((mass > EMPTY_MASS).unsqueeze(-1), updated, previous)


def dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
) -> DKMOutput:
    """Run the DKM iterations on palettes ``x`` (P, n, d) from ``centroids`` (P, k, d).

    Args:
        x: the weights, arranged as palettes (:class:`~.layout.PaletteLayout`); gradients
            flow back into it through every iteration.
        centroids: starting centroids in the units of ``x``; treated as constants (detached).
        tau: temperature (> 0), in units of the palette's weight variance (module docstring).
        max_iter: at most this many attention + centroid-update rounds (>= 1).
        epsilon: stop early once no centroid moves more than ``epsilon`` (in units of the
            palette's standard deviation); 0 runs all ``max_iter`` rounds. Where the test is
            read back and where it stays on the device: :class:`EarlyStop`.
        normalization: fixed centre and scale; computed from ``x`` (detached) when omitted.

    Returns:
        :class:`DKMOutput` with the soft-clustered weights ``A @ C`` in the units and dtype
        of ``x``. The step runs in at least float32 with autocast off, whatever region it is
        called from (module docstring).
    """
    with autocast_disabled(x.device.type):
        problem = normalized_problem(x, centroids, tau, max_iter, epsilon, normalization)
        xt, c = problem.x.transpose(1, 2), problem.centroids  # (P, d, n), (P, k, d)
        stop = EarlyStop(epsilon, xt)
        attention: Tensor | None = None
        for _ in range(max_iter):
            current = soft_assignment(xt, c, tau)
            c_new = update_centroids(current, xt, c)
            converged = stop.advance(c, c_new)
            attention = current if attention is None else stop.keep(current, attention)
            c = stop.keep(c_new, c)
            if converged:
                break
        assert attention is not None
        out, final = denormalized_output(
            torch.bmm(c.transpose(1, 2), attention).transpose(1, 2), c, problem, x, centroids
        )
    return DKMOutput(out, final, attention, stop.iterations)
