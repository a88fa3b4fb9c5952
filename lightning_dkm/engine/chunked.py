r"""The ``"chunked"`` DKM step: the weighted core (:mod:`.weighted`) fed the exact weights.

The same forward as the reference :func:`~lightning_dkm.engine.reference.dkm_cluster` and the
same gradient up to float rounding (tested to 1e-9 in float64), in bounded memory for tensors
of any size and any ``cluster_dim``: every point has weight 1, the rounds before the last keep
nothing for autograd, every pass works on chunks of ``chunk`` weights (extra memory
``O(k * chunk)`` whatever ``n`` and ``max_iter`` are), and the backward is the core's analytic
one, which recomputes each round's attention chunk by chunk unless it is small enough to keep.
``gradient="implicit"`` (IDKM) differentiates at the fixed point instead of through every
round, for vectors too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import (
    DKMOutput,
    Normalization,
    autocast_disabled,
    denormalized_output,
    host_reads_are_free,
    inverse_temperature,
    normalized_problem,
)
from .weighted import (
    DEFAULT_CHUNK,
    check_gradient,
    load_trajectory,
    save_trajectory,
    weighted_dkm,
    weighted_dkm_gradient,
)

__all__ = ["chunked_dkm_cluster"]


class _ChunkedDKM(torch.autograd.Function):
    """DKM of normalised points ``xt`` (P, d, n) from fixed starting centroids ``c0``; saves
    ``xt`` and the core's :class:`~.weighted.Trajectory` (``O(T k d)`` plus small kept
    attentions)."""

    @staticmethod
    def forward(ctx, xt: Tensor, c0: Tensor, inv_tau: Tensor | float, chunk: int,
                max_iter: int, epsilon: float, implicit: bool):
        y, c_final, trajectory = weighted_dkm(xt, None, c0, inv_tau, max_iter=max_iter,
                                              epsilon=epsilon, chunk=chunk, implicit=implicit)
        save_trajectory(ctx, trajectory, xt, inv_tau=inv_tau)
        ctx.chunk, ctx.implicit = chunk, implicit
        ctx.check_errors = host_reads_are_free(xt)
        ctx.mark_non_differentiable(c_final)
        return y, c_final, trajectory.count(0)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_c: Tensor, _grad_iterations):
        trajectory, (xt,), inv_tau = load_trajectory(ctx)
        with autocast_disabled(grad_out.device.type):
            grad, _ = weighted_dkm_gradient(xt, None, trajectory, grad_out, inv_tau,
                                            chunk=ctx.chunk, implicit=ctx.implicit,
                                            check_errors=ctx.check_errors)
        return grad, None, None, None, None, None, None


def chunked_dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
    chunk: int = DEFAULT_CHUNK,
    gradient: str = "unrolled",
) -> DKMOutput:
    """Drop-in for :func:`~lightning_dkm.engine.reference.dkm_cluster` (same arguments, values
    and iteration count) with the core's analytic backward in ``O(k * chunk)`` extra memory
    (module docstring); ``attention`` in the result is an empty tensor."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    check_gradient(gradient, "chunked")
    with autocast_disabled(x.device.type):
        problem = normalized_problem(x, centroids, tau, max_iter, epsilon, normalization)
        xt = problem.x.transpose(1, 2).contiguous()  # (P, d, n)
        out_t, c_final, iterations = _ChunkedDKM.apply(
            xt, problem.centroids.contiguous(), inverse_temperature(tau, xt.dtype), chunk,
            max_iter, epsilon, gradient == "implicit",
        )
        out, final = denormalized_output(out_t.transpose(1, 2), c_final, problem, x, centroids)
    return DKMOutput(out, final, out_t.new_empty(0), iterations)
