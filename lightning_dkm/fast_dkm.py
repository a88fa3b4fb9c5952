r"""A fast, memory-lean DKM step: the same forward as :func:`lightning_dkm.dkm.dkm_cluster`, an
analytic backward through the last iteration, and bounded memory for tensors of any size.

Why. The reference step keeps one ``k x n`` attention matrix (and several temporaries) per
iteration for autograd, and runs ~40 elementwise passes over them; that is DKM's known cost in
time and memory. Here:

* the iterations before the last run under ``no_grad`` and keep nothing;
* every pass works on chunks of ``chunk`` weights, so the ``k x chunk`` temporaries stay in
  cache and extra memory is ``O(k * chunk)`` whatever ``n`` and ``max_iter`` are;
* the backward is written by hand (below) and recomputes the last attention chunk by chunk
  instead of storing it.

Gradient (exact, by recomputation). With :math:`A = \operatorname{softmax}(Z)`,
:math:`Z_{ij} = -\|x_i - c_j\|^2/\tau`, masses :math:`m_j = \sum_i A_{ij}`, updated centroids
:math:`c'_j = \sum_i A_{ij} x_i / m_j` and output :math:`y_i = \sum_j A_{ij} c'_j` of the last
iteration, and :math:`U_j = \partial L / \partial c'_j` (for the last iteration
:math:`U_j = G_j = \sum_i A_{ij} g_i` with :math:`g_i = \partial L/\partial y_i`), each
iteration's backward is

.. math::

    H_j = U_j / m_j, \qquad
    B_{ij} = [g_i \cdot c'_j] + H_j \cdot (x_i - c'_j), \qquad
    \delta_{ij} = A_{ij}\big(B_{ij} - \textstyle\sum_l A_{il} B_{il}\big),

.. math::

    \partial L / \partial x_i \mathrel{+}= \sum_j A_{ij} H_j + \tfrac{2}{\tau} \sum_j
    \delta_{ij} c_j, \qquad
    \partial L / \partial c_j = \tfrac{2}{\tau} \sum_i \delta_{ij} (x_i - c_j)

(the bracketed term only in the last iteration; :math:`\sum_j \delta_{ij} = 0` was used; an
empty cluster passes :math:`U_j` straight to its starting centroid). Going back through every
iteration this way gives the unrolled gradient exactly (the tests compare it with autograd
through :func:`~lightning_dkm.dkm.dkm_cluster` to 1e-9 in float64), while storing only the
centroid trajectory: like activation checkpointing, memory is traded for one recomputation of
each attention chunk.

Without host reads (:func:`~lightning_dkm.dkm.host_reads_are_free`: on an accelerator, under
``torch.compile``) the early stop is decided on the device (:class:`~lightning_dkm.dkm.EarlyStop`):
the trajectory then holds ``max_iter`` rounds, of which the first ``T`` (a device tensor) took
effect, and the backward walks back from round ``T``, picking each round's centroids with
``index_select`` and leaving the gradient unchanged through the rounds that did not run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dkm import (
    EMPTY_MASS,
    DKMOutput,
    EarlyStop,
    Normalization,
    autocast_disabled,
    denormalized_output,
    inverse_temperature,
    normalized_problem,
    pick,
)

__all__ = ["DEFAULT_CHUNK", "fast_dkm_cluster"]

#: Weights per chunk: a k x chunk float32 block of 2**16 columns is 256 KiB per centroid row.
DEFAULT_CHUNK = 1 << 16


def _attention(xt: Tensor, c: Tensor, inv_tau: Tensor | float) -> Tensor:
    """softmax over centroids of ``-|x - c|^2 / tau`` for one chunk: (P, k, m) from xt (P, d, m);
    ``inv_tau`` a float or a 0-dim tensor on the device."""
    if xt.shape[1] == 1:
        z = torch.sub(xt, c)  # (P, k, m)
        z.square_().mul_(-inv_tau)
    else:
        x2 = xt.square().sum(1, keepdim=True)
        c2 = c.square().sum(-1, keepdim=True)
        z = torch.baddbmm(x2 + c2, c, xt, alpha=-2.0).clamp_min_(0.0).mul_(-inv_tau)
    return torch.softmax(z, dim=1)


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _update(xt: Tensor, c: Tensor, inv_tau: Tensor | float, chunk: int
            ) -> tuple[Tensor, Tensor]:
    """One centroid update without autograd: returns (new centroids, masses)."""
    P, k, d = c.shape
    weighted = torch.zeros(P, k, d, dtype=xt.dtype, device=xt.device)
    mass = torch.zeros(P, k, dtype=xt.dtype, device=xt.device)
    for s in _chunks(xt.shape[2], chunk):
        a = _attention(xt[:, :, s], c, inv_tau)
        mass += a.sum(2)
        weighted.baddbmm_(a, xt[:, :, s].transpose(1, 2))
    new = weighted / mass.clamp_min(EMPTY_MASS).unsqueeze(-1)
    return torch.where((mass > EMPTY_MASS).unsqueeze(-1), new, c), mass


class _DKMFunction(torch.autograd.Function):
    """All DKM iterations on normalised ``xt`` (P, d, n) from fixed starting centroids ``c0``.

    Saves only ``xt``, the centroid trajectory ``c_0..c_T`` and the masses (``O(T k d)``);
    the backward recomputes each iteration's attention chunk by chunk. ``inv_tau`` is a float
    or a 0-dim tensor (no host read).
    """

    @staticmethod
    def forward(ctx, xt: Tensor, c0: Tensor, inv_tau: Tensor | float, chunk: int,
                max_iter: int, epsilon: float):
        stop = EarlyStop(epsilon, xt)
        trajectory, masses = [c0], []
        for _ in range(max_iter):
            c_new, mass = _update(xt, trajectory[-1], inv_tau, chunk)
            converged = stop.advance(trajectory[-1], c_new)
            trajectory.append(stop.keep(c_new, trajectory[-1]))
            masses.append(mass)
            if converged:
                break
        stacked, last = torch.stack(trajectory), stop.iterations
        c_start, c_final = pick(stacked, last - 1), pick(stacked, last)
        out = torch.empty_like(xt)
        for s in _chunks(xt.shape[2], chunk):
            out[:, :, s] = torch.bmm(c_final.transpose(1, 2), _attention(xt[:, :, s], c_start,
                                                                         inv_tau))
        on_device = isinstance(last, Tensor)
        ctx.save_for_backward(xt, stacked, torch.stack(masses), *([last] if on_device else []),
                              *([inv_tau] if isinstance(inv_tau, Tensor) else []))
        ctx.chunk, ctx.on_device = chunk, on_device
        ctx.inv_tau = None if isinstance(inv_tau, Tensor) else inv_tau
        ctx.last = None if on_device else last
        ctx.mark_non_differentiable(c_final)
        return out, c_final, last

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_c: Tensor, _grad_iterations):
        with autocast_disabled(grad_out.device.type):
            return _backward(ctx, grad_out), None, None, None, None, None


def _backward(ctx, grad_out: Tensor) -> Tensor:
    """The recomputing backward of the module docstring, from the last round that took effect
    (``last``, an int or a device tensor) back to the first."""
    xt, trajectory, masses, *rest = ctx.saved_tensors
    last = rest.pop(0) if ctx.on_device else ctx.last
    inv_tau = rest.pop(0) if ctx.inv_tau is None else ctx.inv_tau
    chunk, n = ctx.chunk, xt.shape[2]
    two_over_tau = 2.0 * inv_tau
    # d L / d c_T from the output y = A_T c_T:  G_j = sum_i A_ij g_i.
    U = torch.zeros_like(trajectory[0])
    c_start = pick(trajectory, last - 1)
    for s in _chunks(n, chunk):
        a = _attention(xt[:, :, s], c_start, inv_tau)
        U.baddbmm_(a, grad_out[:, :, s].transpose(1, 2))
    grad_x = torch.zeros_like(xt)
    for back in range(masses.shape[0]):  # round t = last - back: c_{t-1} -> c_t
        t = last - back
        c, c_new, mass = pick(trajectory, t - 1), pick(trajectory, t), pick(masses, t - 1)
        live = (mass > EMPTY_MASS).unsqueeze(-1)
        H = torch.where(live, U / mass.clamp_min(EMPTY_MASS).unsqueeze(-1), 0.0)
        if isinstance(t, Tensor):  # a round that did not run contributes nothing
            H = torch.where(t >= 1, H, 0.0)
        bias = (H * c_new).sum(-1, keepdim=True)  # (P, k, 1)
        delta_x = torch.zeros_like(c)  # sum_i delta_ij x_i
        delta_sum = torch.zeros_like(mass)  # sum_i delta_ij
        c_scaled = (c * two_over_tau).transpose(1, 2)
        for s in _chunks(n, chunk):
            xs = xt[:, :, s]
            a = _attention(xs, c, inv_tau)
            b = torch.baddbmm(bias, H, xs, beta=-1.0)  # H_j . x_i - H_j . c'_j
            if back == 0:
                b.baddbmm_(c_new, grad_out[:, :, s])  # + g_i . c'_j
            b.sub_((a * b).sum(1, keepdim=True)).mul_(a)  # delta = A (B - sum_l A B)
            gx = torch.bmm(H.transpose(1, 2), a)  # through c' = A x / m
            gx.baddbmm_(c_scaled, b)  # through the logits
            grad_x[:, :, s] += gx
            delta_x.baddbmm_(b, xs.transpose(1, 2))
            delta_sum += b.sum(2)
        # d L / d c_{t-1}: through the logits, plus the identity for empty clusters (whose
        # centroid is carried over unchanged).
        through_logits = (delta_x - c * delta_sum.unsqueeze(-1)).mul_(two_over_tau)
        U_next = through_logits + torch.where(live, 0.0, U)
        U = torch.where(t >= 1, U_next, U) if isinstance(t, Tensor) else U_next
    return grad_x


def fast_dkm_cluster(
    x: Tensor,
    centroids: Tensor,
    tau: Tensor | float,
    *,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    normalization: Normalization | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> DKMOutput:
    """Drop-in for :func:`~lightning_dkm.dkm.dkm_cluster` (same arguments, same forward values
    and iteration count, the same gradient up to float rounding) with the recomputing
    backward of the module docstring and ``O(k * chunk)`` extra memory. The attention matrix
    is never kept: ``attention`` in the result is an empty tensor. Runs in at least float32
    with autocast off; ``epsilon`` is decided as in :func:`~lightning_dkm.dkm.dkm_cluster`."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    with autocast_disabled(x.device.type):
        problem = normalized_problem(x, centroids, tau, max_iter, epsilon, normalization)
        xt = problem.x.transpose(1, 2).contiguous()  # (P, d, n)
        out_t, c_final, iterations = _DKMFunction.apply(
            xt, problem.centroids.contiguous(), inverse_temperature(tau, xt.dtype), chunk,
            max_iter, epsilon,
        )
        out, final = denormalized_output(out_t.transpose(1, 2), c_final, problem, x, centroids)
    return DKMOutput(out, final, out_t.new_empty(0), iterations)
