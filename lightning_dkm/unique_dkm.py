r"""DKM on the distinct half-precision values of a tensor (the eDKM idea, arXiv 2309.00964).

For scalar clustering (``cluster_dim = 1``) the attention of a weight depends only on its
value. Rounded to float16 *after normalisation* (unit variance, so float16's relative precision
of :math:`2^{-11}` is what matters, not its range), a palette has at most 65,536 distinct values,
usually a few thousand. This step computes the attention once per distinct value ``u`` and
works with per-value counts :math:`w_u`; only a few O(n) gathers and scatters touch every
weight. Cost per step: ``O(n + U k max_iter)`` instead of ``O(n k max_iter)``.

What is approximated, and how much: the attention and the weights in the centroid sums are
those of the float16-rounded value of each (normalised) weight; the gradient passes straight
through the rounding. Relative to the exact step on the unrounded weights, values differ by the
rounding (``|dx| <= 2^{-11} |x_n|`` in units of the weights' standard deviation) times the
attention's sensitivity, which is large only for weights on a cluster boundary. The tests and
``benchmarks/perf_step.py`` measure the difference against the exact step.

Backward (per iteration ``t``, exact for the rounded problem): with
:math:`H_j = \partial L/\partial c'_j / m_j` and
:math:`B_{ij} = g_i c'_j + H_j (v_u - c'_j)` for weight ``i`` of value ``u`` (``g`` only in
the last iteration), :math:`\delta_{ij} = A_{uj}(B_{ij} - \sum_l A_{ul} B_{il})` is affine in
:math:`g_i`, so every per-weight gradient has the form :math:`a_u + b_u g_i`: two gathers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dkm import (
    EMPTY_MASS,
    DKMOutput,
    Normalization,
    denormalized_output,
    inverse_temperature,
    normalized_problem,
)

__all__ = ["unique_dkm_cluster"]

_BUCKETS = 1 << 16  # float16 bit patterns


def _attention(v: Tensor, c: Tensor, inv_tau: float) -> Tensor:
    """softmax over centroids for values v (P, U) and centroids c (P, k): laid out (P, k, U)
    so that every elementwise pass runs over contiguous values."""
    z = (v.unsqueeze(1) - c.unsqueeze(-1)).square_().mul_(-inv_tau)
    return torch.softmax(z, dim=1)


def _bucketize(xn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct float16 values per palette, padded to a common length.

    Returns ``values`` (P, U) float32, ``counts`` (P, U) (0 for padding) and ``inverse`` (P, n),
    the position of each weight's value in its palette's row.
    """
    P = xn.shape[0]
    codes = xn.to(torch.float16).view(torch.int16).to(torch.int64) + (_BUCKETS // 2)
    flat = codes + torch.arange(P, device=xn.device).unsqueeze(1) * _BUCKETS
    counts_all = torch.bincount(flat.reshape(-1), minlength=P * _BUCKETS).view(P, _BUCKETS)
    occupied = counts_all > 0
    per_palette = occupied.sum(1)
    U = int(per_palette.max())
    # rank of each occupied bucket within its palette -> column in the padded (P, U) layout
    rank = occupied.cumsum(1) - 1
    values = torch.zeros(P, U, dtype=torch.float32, device=xn.device)
    counts = torch.zeros(P, U, dtype=torch.float32, device=xn.device)
    rows, buckets = occupied.nonzero(as_tuple=True)
    cols = rank[rows, buckets]
    bucket_values = (buckets - _BUCKETS // 2).to(torch.int16).view(torch.float16).float()
    values[rows, cols] = bucket_values
    counts[rows, cols] = counts_all[rows, buckets].float()
    inverse = rank.gather(1, codes)
    return values, counts, inverse


class _UniqueDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn: Tensor, c0: Tensor, inv_tau: float, max_iter: int, epsilon: float):
        values, counts, inverse = _bucketize(xn.detach())
        trajectory, masses = [c0], []
        for _ in range(max_iter):
            c = trajectory[-1]
            a = _attention(values, c, inv_tau).mul_(counts.unsqueeze(1))  # w_u A_uj
            mass = a.sum(2)
            new = torch.bmm(a, values.unsqueeze(-1)).squeeze(-1) / mass.clamp_min(EMPTY_MASS)
            new = torch.where(mass > EMPTY_MASS, new, c)
            converged = epsilon > 0 and bool((new - c).abs().amax() <= epsilon)
            trajectory.append(new)
            masses.append(mass)
            if converged:
                break
        a_last = _attention(values, trajectory[-2], inv_tau)
        y_values = torch.bmm(trajectory[-1].unsqueeze(1), a_last).squeeze(1)  # (P, U)
        ctx.save_for_backward(values, counts, inverse, torch.stack(trajectory), torch.stack(masses))
        ctx.inv_tau = inv_tau
        c_final = trajectory[-1]
        ctx.mark_non_differentiable(c_final)
        return y_values.gather(1, inverse), c_final, len(masses)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_c: Tensor, _grad_iterations):
        values, counts, inverse, trajectory, masses = ctx.saved_tensors
        inv_tau = ctx.inv_tau
        P, U = values.shape
        G_u = torch.zeros(P, U, dtype=grad_out.dtype, device=grad_out.device)
        G_u.scatter_add_(1, inverse, grad_out)  # sum of g over each value's weights
        a_coef = torch.zeros_like(values)  # per-value constant part of d L / d x_i
        b_coef = torch.zeros_like(values)  # per-value factor of g_i
        T = masses.shape[0]
        A = _attention(values, trajectory[T - 1], inv_tau)
        U_c = torch.bmm(A, G_u.unsqueeze(-1)).squeeze(-1)  # d L / d c_T = sum_u A_uj G_u
        v_row = values.unsqueeze(1)  # (P, 1, U)
        for t in range(T, 0, -1):
            c, c_new, mass = trajectory[t - 1], trajectory[t], masses[t - 1]
            if t != T:
                A = _attention(values, c, inv_tau)
            live = mass > EMPTY_MASS
            H = torch.where(live, U_c / mass.clamp_min(EMPTY_MASS), 0.0)  # (P, k)
            c_col, H_col = c.unsqueeze(-1), H.unsqueeze(-1)  # (P, k, 1)
            Q = (v_row - c_new.unsqueeze(-1)).mul_(H_col)  # (P, k, U)
            dQ = Q.sub_((A * Q).sum(1, keepdim=True)).mul_(A)  # delta without the g part
            a_coef += (A * H_col).sum(1) + 2.0 * inv_tau * (dQ * c_col).sum(1)
            # sum_i delta_ij (v_u - c_j) over the weights of each value, for d L / d c_{t-1}
            offset = v_row - c_col  # (P, k, U)
            grad_c = torch.bmm(dQ.mul_(offset), counts.unsqueeze(-1)).squeeze(-1)
            if t == T:
                Pn = c_new.unsqueeze(-1)
                dP = A * (Pn - (A * Pn).sum(1, keepdim=True))  # delta per unit g
                b_coef += 2.0 * inv_tau * (dP * c_col).sum(1)
                grad_c += torch.bmm(dP.mul_(offset), G_u.unsqueeze(-1)).squeeze(-1)
            U_c = 2.0 * inv_tau * grad_c + torch.where(live, 0.0, U_c)
        grad_x = a_coef.gather(1, inverse) + b_coef.gather(1, inverse) * grad_out
        return grad_x, None, None, None, None


def unique_dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
) -> DKMOutput:
    """DKM for ``cluster_dim = 1`` on the distinct float16 values of the normalised weights.

    Same arguments and outputs as :func:`~lightning_dkm.dkm.dkm_cluster` (``attention`` is an
    empty tensor); values and gradients are those of DKM on the rounded weights (module
    docstring).
    """
    if x.shape[-1] != 1:
        raise ValueError(f"the 'unique' DKM step needs cluster_dim 1; got {x.shape[-1]}")
    problem = normalized_problem(x, centroids, tau, max_iter, epsilon, normalization)
    out_n, c_final, iterations = _UniqueDKM.apply(
        problem.x.squeeze(-1).float(), problem.centroids.squeeze(-1).float(),
        inverse_temperature(tau), max_iter, epsilon,
    )
    out, final = denormalized_output(
        out_n.unsqueeze(-1), c_final.unsqueeze(-1), problem, x, centroids
    )
    return DKMOutput(out, final, out_n.new_empty(0), iterations)
