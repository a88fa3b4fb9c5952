r"""DKM on the distinct half-precision values of a tensor (the eDKM idea, arXiv 2309.00964).

For scalar clustering (``cluster_dim = 1``) the attention of a weight depends only on its
value. Rounded to float16 *after normalisation* (unit variance, so float16's relative precision
of :math:`2^{-11}` is what matters, not its range), a palette has at most 65,536 distinct values,
about 2 x 10^4 for half a million Gaussian weights. This step runs every DKM iteration on the
distinct values ``u`` with their counts :math:`w_u`, forward and backward; cost per step
``O(n + U k max_iter)`` instead of ``O(n k max_iter)``.

**What touches every weight, and why it is so little.** Each weight's float16 bit pattern is
its *code*, an index into a dense table of 65,536 entries per palette. The forward makes the
codes (two elementwise passes), counts them (``bincount``) and, at the end, reads each output
from a dense table of the clustered values, already in the weights' units (one ``gather``). The
backward sums the incoming gradient per code (one ``scatter_add``) and reads each weight's
gradient :math:`a_u + b_u g_i` from one dense table of packed pairs ``(a_u, b_u)`` (one
``gather`` and one ``addcmul``). Normalising and denormalising happen on the distinct values,
not on the weights: the normalisation constants cancel in the gradient. Autograd saves only the
int16 codes (half the size of float32 weights) and ``O(U k max_iter)`` for the values.

**What is approximated, and how much.** The attention and the weights in the centroid sums are
those of the float16-rounded value of each normalised weight; the gradient passes straight
through the rounding. The result is *exactly* DKM of the rounded weights (the tests compare with
the reference step on float16-representable inputs to 1e-5). On arbitrary weights the values
differ by the rounding (``|dx| <= 2^{-11} |x_n|`` in units of the weights' standard deviation)
times the attention's sensitivity, which is large only for weights on a cluster boundary;
``docs/benchmarks.md`` gives the measured difference.

Backward (per iteration ``t``, exact for the rounded problem): with
:math:`H_j = \partial L/\partial c'_j / m_j` and
:math:`B_{ij} = g_i c'_j + H_j (v_u - c'_j)` for weight ``i`` of value ``u`` (``g`` only in
the last iteration), :math:`\delta_{ij} = A_{uj}(B_{ij} - \sum_l A_{ul} B_{il})` is affine in
:math:`g_i`, so every per-weight gradient has the form :math:`a_u + b_u g_i`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .dkm import (
    EMPTY_MASS,
    DKMOutput,
    Normalization,
    check_step_arguments,
    inverse_temperature,
    scale_of,
)

__all__ = ["KEEP_ATTENTION_MAX_ENTRIES", "unique_dkm_cluster"]

#: The forward keeps its attention matrices for the backward (instead of recomputing them)
#: while all ``max_iter`` of them together have at most this many entries (4 MiB in float32):
#: extra memory stays bounded whatever ``max_iter`` and ``n`` are.
KEEP_ATTENTION_MAX_ENTRIES = 1 << 20

_CODES = 1 << 16  # float16 bit patterns per palette
_CODE_OFFSET = _CODES // 2  # int16 bit pattern + offset = column in the dense (P, 65536) table


class _DistinctValues(NamedTuple):
    """The occupied codes of every palette, compacted into a padded ``(P, U)`` layout."""

    ids: Tensor  # (V,) flat ids ``palette * 65536 + column`` of the occupied codes, ascending
    rows: Tensor | None  # (V,) their palette (None for a single palette)
    cols: Tensor | None  # (V,) their place in the palette's row of the padded layout
    values: Tensor  # (P, U) the float16 values (as float32), 0 in padding
    counts: Tensor  # (P, U) weights per value, 0 in padding

    def to_dense(self, compact: Tensor) -> Tensor:
        """(P, U) per distinct value -> (P, 65536) per code. Entries of unoccupied codes are
        left uninitialised: no weight has such a code, so nothing ever reads them."""
        P = compact.shape[0]
        picked = compact.view(-1) if self.rows is None else compact[self.rows, self.cols]
        dense = compact.new_empty(P * _CODES)
        return dense.scatter_(0, self.ids, picked).view(P, _CODES)

    def from_dense(self, dense: Tensor) -> Tensor:
        """(P, 65536) per code -> (P, U) per distinct value (0 in padding)."""
        picked = dense.view(-1).index_select(0, self.ids)
        if self.rows is None:
            return picked.unsqueeze(0)
        compact = dense.new_zeros(self.values.shape)
        compact[self.rows, self.cols] = picked
        return compact


@torch.no_grad()
def _float16_codes(x: Tensor, normalization: Normalization | None) -> tuple[Tensor, Tensor, Tensor]:
    """The bit pattern (P, n) int16 of each weight's normalised value in float16, with the
    normalisation's centre and scale (P, 1, 1); computed from ``x`` (P, n, 1) when not given.
    One temporary the size of the weights (the deviations, normalised in place)."""
    if normalization is None:
        center = x.mean(dim=1, keepdim=True)
        deviations = x - center
        scale = scale_of(deviations, center)
    else:
        center = normalization.center.to(x.dtype)
        scale = normalization.scale.to(x.dtype)
        deviations = x - center
    codes = deviations.div_(scale).squeeze(-1).to(torch.float16).view(torch.int16)
    return codes, center, scale


def _columns(codes: Tensor) -> Tensor:
    """int16 codes -> int64 columns ``code + 32768`` of the dense table (the index type
    ``gather`` and ``scatter_add`` take)."""
    return codes.to(torch.int64).add_(_CODE_OFFSET)


def _distinct_values(columns: Tensor, dtype: torch.dtype) -> _DistinctValues:
    P = columns.shape[0]
    if P == 1:
        dense_counts = torch.bincount(columns.view(-1), minlength=_CODES)
        ids = dense_counts.nonzero().squeeze(1)
        values = (ids - _CODE_OFFSET).to(torch.int16).view(torch.float16).to(dtype)
        counts = dense_counts[ids].to(dtype)
        return _DistinctValues(ids, None, None, values.unsqueeze(0), counts.unsqueeze(0))
    offsets = torch.arange(0, P * _CODES, _CODES, device=columns.device).unsqueeze(1)
    dense_counts = torch.bincount((columns + offsets).view(-1), minlength=P * _CODES)
    ids = dense_counts.nonzero().squeeze(1)
    rows = torch.div(ids, _CODES, rounding_mode="floor")
    per_palette = torch.bincount(rows, minlength=P)
    width = int(per_palette.max())
    starts = per_palette.cumsum(0) - per_palette
    cols = torch.arange(ids.numel(), device=ids.device) - starts[rows]
    bit_patterns = (ids - rows * _CODES - _CODE_OFFSET).to(torch.int16)
    values = torch.zeros(P, width, dtype=dtype, device=ids.device)
    counts = torch.zeros(P, width, dtype=dtype, device=ids.device)
    values[rows, cols] = bit_patterns.view(torch.float16).to(dtype)
    counts[rows, cols] = dense_counts[ids].to(dtype)
    return _DistinctValues(ids, rows, cols, values, counts)


def _attention(v: Tensor, c: Tensor, inv_tau: float) -> Tensor:
    """softmax over centroids for values v (P, U) and centroids c (P, k): laid out (P, k, U)
    so that every elementwise pass runs over contiguous values."""
    z = (v.unsqueeze(1) - c.unsqueeze(-1)).square_().mul_(-inv_tau)
    return torch.softmax(z, dim=1)


def _moments(weights: Tensor, values: Tensor) -> Tensor:
    """(P, 2, U): per distinct value, ``weights`` and ``weights * value`` (for sums over it)."""
    return torch.stack((weights, weights * values), 1)


def _sum_over_values(rows: Tensor, attention: Tensor) -> Tensor:
    r""":math:`\sum_u r_{cu} A_{ju}`: (P, c, k) from ``rows`` (P, c, U) and ``attention``
    (P, k, U). Written as ``rows @ attention^T`` because both operands then run along U in
    memory: about 5x faster on CPU than ``attention @ rows^T`` for a handful of rows."""
    return torch.bmm(rows, attention.transpose(1, 2))


def _pull(delta: Tensor, moments: Tensor, c: Tensor) -> Tensor:
    r""":math:`\sum_u \delta_{uj} w_u (v_u - c_j)` (P, k) for ``delta`` (P, k, U) and the
    ``moments`` (:func:`_moments`) of weights :math:`w_u`."""
    r = _sum_over_values(moments, delta)
    return r[:, 1] - c * r[:, 0]


class _UniqueDKM(torch.autograd.Function):
    """DKM of ``x`` (P, n) from normalised centroids ``c0`` (P, k), on the distinct float16
    values ``codes`` (P, n) of its normalised weights; ``center`` and ``scale`` (P, 1) are the
    normalisation (constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, center: Tensor, scale: Tensor, c0: Tensor,
                inv_tau: float, max_iter: int, epsilon: float):
        columns = _columns(codes)
        distinct = _distinct_values(columns, c0.dtype)
        values = distinct.values
        moments = _moments(distinct.counts, values)  # mass and weighted sum in one bmm
        keep = max_iter * values.numel() * c0.shape[1] <= KEEP_ATTENTION_MAX_ENTRIES
        trajectory, masses, kept = [c0], [], []
        for _ in range(max_iter):
            c = trajectory[-1]
            A = _attention(values, c, inv_tau)
            if keep:
                kept.append(A)
            r = _sum_over_values(moments, A)  # (P, 2, k): sum_u w_u A_uj (1, v_u)
            mass = r[:, 0]
            new = torch.where(mass > EMPTY_MASS, r[:, 1] / mass.clamp_min(EMPTY_MASS), c)
            converged = epsilon > 0 and bool((new - c).abs().amax() <= epsilon)
            trajectory.append(new)
            masses.append(mass)
            if converged:
                break
        y_values = torch.bmm(trajectory[-1].unsqueeze(1), A).squeeze(1)  # (P, U)
        table = distinct.to_dense((y_values * scale + center).to(x.dtype))
        ctx.distinct = distinct._replace(values=None, counts=None)
        ctx.save_for_backward(codes, values, moments, torch.stack(trajectory),
                              torch.stack(masses), *kept)
        ctx.inv_tau = inv_tau
        c_final = trajectory[-1]
        ctx.mark_non_differentiable(c_final)
        return table.gather(1, columns), c_final, len(masses)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_c: Tensor, _grad_iterations):
        codes, values, moments, trajectory, masses, *kept = ctx.saved_tensors
        distinct, two_over_tau = ctx.distinct._replace(values=values), 2.0 * ctx.inv_tau
        columns = _columns(codes)
        g = grad_out.to(values.dtype)
        dense_g = torch.zeros(values.shape[0], _CODES, dtype=g.dtype, device=g.device)
        G_u = distinct.from_dense(dense_g.scatter_add_(1, columns, g))  # sum of g per value
        T = masses.shape[0]
        for t in range(T, 0, -1):  # iteration t: c_{t-1} -> c_t, attention A_t
            c, c_new, mass = trajectory[t - 1], trajectory[t], masses[t - 1]
            A = kept[t - 1] if kept else _attention(values, c, ctx.inv_tau)
            c_row = c.unsqueeze(1)  # (P, 1, k)
            if t == T:  # the output y_u = sum_j A_uj c_j'
                U_c = _sum_over_values(G_u.unsqueeze(1), A).squeeze(1)  # d L / d c_T
                y = torch.bmm(c_new.unsqueeze(1), A)  # (P, 1, U)
                dP = (c_new.unsqueeze(-1) - y).mul_(A)  # delta per unit g
                b_coef = two_over_tau * torch.bmm(c_row, dP).squeeze(1)  # factor of g_i
                grad_c = _pull(dP, _moments(G_u, values), c)
                a_coef = torch.zeros_like(values)  # constant part of d L / d x_i
            else:
                grad_c = 0.0
            live = mass > EMPTY_MASS
            H = torch.where(live, U_c / mass.clamp_min(EMPTY_MASS), 0.0)  # (P, k)
            Q = (values.unsqueeze(1) - c_new.unsqueeze(-1)).mul_(H.unsqueeze(-1))  # (P, k, U)
            dQ = Q.sub_((A * Q).sum(1, keepdim=True)).mul_(A)  # delta without the g part
            a_coef += torch.bmm(H.unsqueeze(1), A).squeeze(1)
            a_coef += two_over_tau * torch.bmm(c_row, dQ).squeeze(1)
            grad_c = grad_c + _pull(dQ, moments, c)
            U_c = two_over_tau * grad_c + torch.where(live, 0.0, U_c)
        a_i, b_i = _gather_pair(distinct, a_coef, b_coef, columns)
        grad_x = torch.addcmul(a_i, b_i, g).to(grad_out.dtype)
        return grad_x, None, None, None, None, None, None, None


def _gather_pair(distinct: _DistinctValues, a: Tensor, b: Tensor, columns: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Per weight, the ``a`` and ``b`` (P, U) of its distinct value. A float32 pair travels
    as one int64, so one gather serves both (gathers are the slow, latency-bound part)."""
    if a.dtype == torch.float32:
        packed = torch.stack((a, b), -1).view(torch.int64).squeeze(-1)  # (P, U)
        gathered = distinct.to_dense(packed).gather(1, columns)
        return gathered.view(torch.float32).view(*columns.shape, 2).unbind(-1)
    return distinct.to_dense(a).gather(1, columns), distinct.to_dense(b).gather(1, columns)


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
    check_step_arguments(tau, max_iter, epsilon)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    codes, center, scale = _float16_codes(x.detach().to(compute_dtype), normalization)
    center, scale = center.reshape(-1, 1), scale.reshape(-1, 1)
    c0 = (centroids.detach().squeeze(-1).to(compute_dtype) - center) / scale
    out, c_final, iterations = _UniqueDKM.apply(
        x.squeeze(-1), codes, center, scale, c0, inverse_temperature(tau), max_iter, epsilon
    )
    final = (c_final * scale + center).to(centroids.dtype).unsqueeze(-1)
    return DKMOutput(out.unsqueeze(-1), final, out.new_empty(0), iterations)
