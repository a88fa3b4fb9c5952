r"""The one DKM core: weighted DKM on points and their counts, with its analytic backward.

Every DKM step of the package is this computation on what it feeds in (and the plain-autograd
:func:`~lightning_dkm.engine.reference.dkm_cluster` is its test oracle): the ``"chunked"`` step
(:mod:`.chunked`) feeds the exact normalised weights, each counted once; the ``"unique"`` step
(:mod:`.distinct`) feeds the distinct float16 values of a palette with their counts (eDKM).

**Forward.** For points :math:`v_u \in R^d` with counts :math:`w_u` and centroids :math:`c`,
each round is

.. math::

    A_{uj} = \operatorname{softmax}_j\big(-\|v_u - c_j\|^2 / \tau\big), \qquad
    m_j = \sum_u w_u A_{uj}, \qquad c'_j = \frac{1}{m_j}\sum_u w_u A_{uj} v_u,

and the output of a point is :math:`y_u = \sum_j A_{uj} c'_j` of the last round that took effect
(its attention from that round's starting centroids). A cluster with mass below ``EMPTY_MASS``
keeps its centroid. The points are walked in chunks of ``chunk``, so the ``k x chunk``
temporaries stay in cache and the extra memory does not grow with the number of points; the
attention of every kept round is stored for the backward while all of them together have at
most ``KEEP_ATTENTION_MAX_ENTRIES`` entries, else recomputed there chunk by chunk (like
activation checkpointing).

**Backward.** The gradient reaching a point has two parts. With :math:`U_j = \partial L /
\partial c'_j` (for the last round :math:`U_j = \sum_u A_{uj} G_u`, :math:`G_u` the loss
gradient of :math:`y_u` summed over the point's copies), :math:`H_j = U_j / m_j`,
:math:`B_{uj} = H_j \cdot (v_u - c'_j)` and :math:`\delta_{uj} = A_{uj}(B_{uj} - \sum_l A_{ul}
B_{ul})`, each round gives *every copy* of point ``u``

.. math::

    s_u \mathrel{+}= \sum_j A_{uj} H_j + \tfrac{2}{\tau}\sum_j \delta_{uj} c_j,
    \qquad
    \partial L / \partial c_j = \tfrac{2}{\tau}\sum_u w_u \delta_{uj} (v_u - c_j)

(the *shared* part, through the centroids; :math:`\sum_j \delta_{uj} = 0` was used; an empty
cluster passes :math:`U_j` to its starting centroid). The output's own attention adds the
*local* part, :math:`\tfrac{2}{\tau}\sum_j \delta^L_{ij} c_j` with :math:`B^L_{ij} = g_i \cdot
c'_j`, for the copy's own gradient :math:`g_i`, and :math:`\tfrac{2}{\tau}\sum_i \delta^L_{ij}
(v_i - c_j)` on the last starting centroids. For counts of 1 (the exact step) both parts are
folded into one :math:`\delta` per round. For scalar points with counts the local part is
affine in :math:`g_i`: a coefficient :math:`b_u` per point (:math:`B^L` with :math:`g = 1`),
and every copy's gradient is :math:`s_u + b_u g_i` (two table lookups in :mod:`.distinct`).
For those, on the CPU in float32, each round back and the local part are one C loop
(:mod:`.native`: one read of the attention instead of some ten passes; the same gradient up to
summation order).

**Implicit gradient** (IDKM, arXiv 2312.07759): instead of walking back through every round,
the adjoint equation :math:`(I - J^\top) w = r` of the last round's map :math:`c' = F(c)` is
solved exactly, :math:`J_{jl} = \tfrac{2}{\tau m_j}\sum_u w_u A_{uj}(\delta_{jl} - A_{ul})
(v_u - c'_j)(v_u - c_l)^\top` being a ``k d x k d`` matrix per palette; the shared part is then
that of one round with :math:`U = w`. Work and memory of the backward do not depend on
``max_iter``; it equals the unrolled gradient in the limit of many rounds (tested).

**Batches** (:func:`~.distinct.unique_dkm_batch`): palettes of several tensors run as one
problem: points of weight 0 pad the shorter ones, a ``centroid_mask`` gives padding centroids
attention exactly 0 (a palette with fewer centroids), ``inv_tau`` may be one per palette, and
``groups`` gives each tensor its own early stop (:class:`~.numerics.Groups`).

**Without host reads** (:func:`~.numerics.host_reads_are_free`) the early stop is decided on the
device (:class:`~.numerics.EarlyStop`): all ``max_iter`` rounds run, the first ``last`` (a
device tensor per palette) take effect, and the backward picks each palette's round by
indexing on the device and leaves the gradient unchanged through the rounds that did not run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, NamedTuple, TypeVar, get_args

import torch
from torch import Tensor

from . import native
from .kmeans import sq_distances
from .numerics import EMPTY_MASS, EarlyStop, Groups, chunks, pick

__all__ = [
    "DEFAULT_CHUNK",
    "GRADIENTS",
    "KEEP_ATTENTION_MAX_ENTRIES",
    "LOGIT_FLOOR",
    "Gradient",
    "Trajectory",
    "attention",
    "attention_entropy",
    "check_gradient",
    "load_trajectory",
    "save_trajectory",
    "weighted_dkm",
    "weighted_dkm_gradient",
]

#: Points per chunk: a k x chunk float32 block of 2**16 columns is 256 KiB per centroid row.
DEFAULT_CHUNK = 1 << 16

_R = TypeVar("_R")

#: An attention weight below ``e^-LOGIT_FLOOR`` (about 9e-27) of its point's largest is 0
#: (:func:`attention`). Such weights are far below float32's precision in every sum they join,
#: but a saturated attention's far centroids underflowed into subnormal numbers, in the
#: attention and in the products the backward forms with it, and on x86 every op that reads a
#: subnormal number takes a microcode assist per element: 4,096 values and 16 centroids took
#: 1.88 + 2.79 ms forward + backward, 0.61 + 0.63 ms with the floor
#: (``benchmarks/perf_core.py``). ``e^-60`` also keeps the backward's products of an
#: attention weight with factors down to about 1e-11 normal.
LOGIT_FLOOR = 60.0
_FLOOR_WEIGHT = math.exp(-LOGIT_FLOOR)

#: The forward keeps the attention of the rounds the backward needs (instead of recomputing
#: them) while all of them together have at most this many entries (4 MiB in float32); a batch
#: of tensors (``groups``) this many per tensor, what each would keep in a call of its own.
KEEP_ATTENTION_MAX_ENTRIES = 1 << 20


def attention(xt: Tensor, c: Tensor, inv_tau: Tensor | float,
              centroid_mask: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``softmax_j(-|x - c_j|^2 / tau)`` laid out ``(P, k, m)`` for points ``xt`` (P, d, m)
    and centroids ``c`` (P, k, d); ``inv_tau`` a float, a 0-dim tensor on the device, or one
    per palette ``(P, 1, 1)``. ``centroid_mask`` (P, k, 1): False for padding centroids (a
    batch of palettes with different ``k``), whose attention is exactly 0. The points run
    innermost (:func:`~.kmeans.sq_distances`). ``out``: a (P, k, m) tensor to compute it in
    (the forward's slot for a kept round: no copy into the stack of kept rounds after); the
    same values.

    A weight below ``e^-LOGIT_FLOOR`` of its point's largest is exactly 0 (:data:`LOGIT_FLOOR`).
    """
    e = _floored_exp(_shifted_logits(xt, c, inv_tau, centroid_mask, out), in_place=True)
    if centroid_mask is not None:
        e.masked_fill_(~centroid_mask, 0.0)
    return e.div_(e.sum(1, keepdim=True))


def attention_entropy(xt: Tensor, c: Tensor, inv_tau: Tensor | float) -> Tensor:
    r"""The entropy in nats of each point's :func:`attention` (same arguments, no mask):
    (P, m). With the shifted logits :math:`z_j` (largest 0), :math:`e_j = e^{z_j}` (0 below
    the floor) and :math:`S = \sum_j e_j`, each entry is :math:`p_j = e_j / S`, so

    .. math:: -\sum_j p_j \log p_j = \log S - \tfrac{1}{S} \sum_j e_j z_j

    (an entry at 0 adds 0 to both sides): one logarithm per point instead of one per entry,
    and no probabilities formed. Both terms are >= 0 (:math:`S \ge 1`, :math:`z_j \le 0`),
    so nothing cancels; it agrees with ``-torch.special.xlogy(p, p).sum(1)`` to float rounding."""
    z = _shifted_logits(xt, c, inv_tau)
    e = _floored_exp(z, in_place=False)
    total = e.sum(1)
    return total.log().sub_(e.mul_(z).sum(1).div_(total))


def _shifted_logits(xt: Tensor, c: Tensor, inv_tau: Tensor | float,
                    centroid_mask: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """The attention's logits ``-|x - c_j|^2 / tau`` (P, k, m) less each point's largest,
    raised to just below ``-LOGIT_FLOOR`` (a padding centroid's too): every entry finite."""
    z = sq_distances(xt, c, out=out).mul_(-inv_tau)  # (P, k, m)
    if centroid_mask is not None:
        z.masked_fill_(~centroid_mask, float("-inf"))
    return z.sub_(z.amax(1, keepdim=True)).clamp_min_(-LOGIT_FLOOR - 1.0)


def _floored_exp(z: Tensor, in_place: bool) -> Tensor:
    """``exp(z)`` with every value at or below ``e^-LOGIT_FLOOR`` exactly 0."""
    e = z.exp_() if in_place else z.exp()
    return torch.nn.functional.threshold_(e, _FLOOR_WEIGHT, 0.0)


class Trajectory(NamedTuple):
    """What the forward leaves for the backward: ``O(rounds * k * d)`` plus kept attentions.

    ``last`` has one shape on every path, (P,) int64 on the device: the batched step needs a
    count per palette (each tensor of a batch stops on its own), and without host reads the
    counts exist only on the device. Where the host knows that every palette took the same
    ``ran`` rounds (the stop decided there, no early stop, or every tensor of a batch stopped
    at the same round: :meth:`~.numerics.EarlyStop.rounds`), :meth:`round` gives plain int
    indices, so that the CPU step picks its rounds as views and masks none."""

    centroids: Tensor  # (R + 1, P, k, d): c_0 .. c_R, normalised units
    masses: Tensor  # (R, P, k): each round's cluster masses
    last: Tensor  # (P,) int64 on the device: the rounds that took effect (<= R) per palette
    kept: Tensor | None  # (R, P, k, U): each round's attention, or None (recomputed)
    #: the rounds every palette took (``last`` then holds it everywhere), where the host knows
    #: it; None where it is known on the device only or differs between palettes
    ran: int | None
    #: only the last round is kept (centroids ``c_{T-1}, c_T``): the implicit gradient's need
    last_only: bool = False

    def round(self, back: int) -> int | Tensor:
        """Each palette's round ``back`` rounds before its last (0: the last), as an index into
        :attr:`masses` (round ``i`` moves ``c_i`` to ``c_{i+1}``): an int where :attr:`ran` is
        known, else (P,) on the device (negative for a round that did not run)."""
        if self.last_only:
            return 0
        if self.ran is not None:
            return self.ran - 1 - back
        return self.last - (1 + back)

    def count(self, palette: int) -> int | Tensor:
        """The rounds that took effect for ``palette``, as
        :attr:`~.numerics.DKMOutput.iterations` reports them: an int where :attr:`ran` is
        known, else a 0-dim tensor on the device."""
        return self.ran if self.ran is not None else self.last[palette]


class _Points:
    """The points ``xt`` (P, d, U) with their ``counts`` (P, U) (``None``: all 1), walked in
    chunks; the weighted sums of a round come from one product per chunk."""

    def __init__(self, xt: Tensor, counts: Tensor | None, chunk: int,
                 centroid_mask: Tensor | None = None) -> None:
        self.xt, self.counts, self.chunk, self.centroid_mask = xt, counts, chunk, centroid_mask
        # (P, 1 + d, U): each point's count over its weighted coordinates
        self.rows = None if counts is None else torch.cat(
            (counts.unsqueeze(1), xt * counts.unsqueeze(1)), 1)

    def parts(self) -> Iterator[slice]:
        return chunks(self.xt.shape[2], self.chunk)

    def pull(self, s: slice, delta: Tensor, c: Tensor) -> Tensor:
        r""":math:`\sum_u w_u \delta_{uj} (v_u - c_j)` over chunk ``s``: (P, k, d), how the
        softmax's logits move the starting centroids (one product with the weighted rows)."""
        if self.rows is None:
            return _unweighted_pull(delta, self.xt[:, :, s], c)
        return _pull(self.rows[:, :, s], delta, c)

    def sums(self, s: slice, a: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\sum_u w_u A_{uj}, \sum_u w_u A_{uj} v_u)` over chunk ``s``: (P, k),
        (P, k, d). Written as ``rows @ A^T`` so that both operands run along the points in
        memory (about 5x faster on CPU than ``A @ rows^T`` for a handful of rows). Points
        counted once keep ``A.sum`` and ``A @ v^T``: the exact step's sums of many points, which
        ``sum``'s cascade adds more accurately than a product with a row of ones
        (``tests/test_coreai_opt_plugin.py`` holds its gradient to autograd's)."""
        if self.rows is None:
            return a.sum(2), torch.bmm(a, self.xt[:, :, s].transpose(1, 2))
        r = torch.bmm(self.rows[:, :, s], a.transpose(1, 2))  # (P, 1 + d, k)
        return r[:, 0], r[:, 1:].transpose(1, 2)


def weighted_dkm(xt: Tensor, counts: Tensor | None, c0: Tensor, inv_tau: Tensor | float, *,
                 max_iter: int, epsilon: float, chunk: int = DEFAULT_CHUNK,
                 implicit: bool = False, centroid_mask: Tensor | None = None,
                 groups: Groups | None = None) -> tuple[Tensor, Tensor, Trajectory]:
    """The forward of the module docstring, without autograd.

    Args:
        xt: the points ``(P, d, U)`` in normalised units.
        counts: ``(P, U)`` (0 for padding), or ``None`` for all 1.
        c0: starting centroids ``(P, k, d)``.
        inv_tau: ``1 / tau``, a float, a 0-dim tensor (no host read) or one per palette
            ``(P, 1, 1)``.
        max_iter, epsilon: at most this many rounds; stop once no centroid moves more than
            ``epsilon`` (:class:`~.numerics.EarlyStop`).
        chunk: points per chunk.
        implicit: keep only what the implicit gradient needs (the last round).
        centroid_mask: ``(P, k, 1)``, False for padding centroids (:func:`attention`); the
            same mask goes to :func:`weighted_dkm_gradient`.
        groups: each palette's group (a tensor of a batch): each group's early stop is its
            own (:class:`~.numerics.EarlyStop`).

    Returns:
        ``(y, c_final, trajectory)``: the soft points ``(P, d, U)``, the final centroids and
        what :func:`weighted_dkm_gradient` needs.
    """
    points = _Points(xt, counts, chunk, centroid_mask)
    P, k, d = c0.shape
    n = xt.shape[2]
    # a batch of tensors may keep what its tensors would keep each in its own call
    budget = KEEP_ATTENTION_MAX_ENTRIES * (1 if groups is None else groups.count)
    keep = (1 if implicit else max_iter) * P * k * n <= budget
    stop = EarlyStop(epsilon, xt, groups)
    centroids, masses = [c0], []
    # every round's attention is computed in its slot of one buffer, not stacked after
    kept = xt.new_empty(max_iter, P, k, n) if keep else None
    for i in range(max_iter):
        c = centroids[-1]
        mass = xt.new_zeros(P, k)
        weighted = xt.new_zeros(P, k, d)
        for s in points.parts():
            slot = None if kept is None else kept[i, :, :, s]
            a = attention(xt[:, :, s], c, inv_tau, centroid_mask, out=slot)
            chunk_mass, chunk_weighted = points.sums(s, a)
            mass += chunk_mass
            weighted += chunk_weighted
        new = torch.where((mass > EMPTY_MASS).unsqueeze(-1),
                          weighted / mass.clamp_min(EMPTY_MASS).unsqueeze(-1), c)
        converged = stop.advance(c, new)
        centroids.append(stop.keep(new, c))
        masses.append(mass)
        if converged:
            break
    ran = stop.rounds()
    trajectory = Trajectory(torch.stack(centroids), torch.stack(masses), stop.per_palette(P),
                            None if kept is None else kept[: len(masses)], ran)
    i = trajectory.round(0)
    final = _Round(trajectory, i)
    c_final = final.c_new
    y = torch.empty_like(xt)
    for s in points.parts():
        y[:, :, s] = torch.bmm(c_final.transpose(1, 2), final.attention(points, s, inv_tau))
    if implicit:  # only the last round c_{T-1} -> c_T
        trajectory = trajectory._replace(
            centroids=torch.stack((final.c, c_final)),
            masses=pick(trajectory.masses, i).unsqueeze(0),
            kept=None if trajectory.kept is None else final.kept.unsqueeze(0), last_only=True,
        )
    return y, c_final, trajectory


class _Round:
    """One round of a trajectory (``i``: its index, 0 for the first kept): its starting and
    updated centroids, its masses and its attention (kept, or recomputed per chunk)."""

    def __init__(self, trajectory: Trajectory, i: int | Tensor) -> None:
        self.c = pick(trajectory.centroids, i)
        self.c_new = pick(trajectory.centroids, i + 1)
        mass = pick(trajectory.masses, i)
        self.live = (mass > EMPTY_MASS).unsqueeze(-1)  # (P, k, 1)
        self.mass = mass.clamp_min(EMPTY_MASS).unsqueeze(-1)
        self.kept = None if trajectory.kept is None else pick(trajectory.kept, i)

    def attention(self, points: _Points, s: slice, inv_tau: Tensor | float) -> Tensor:
        if self.kept is not None:
            return self.kept[:, :, s]
        return attention(points.xt[:, :, s], self.c, inv_tau, points.centroid_mask)


def _delta(a: Tensor, b: Tensor) -> Tensor:
    """``A (B - sum_l A B)`` in place of ``b``: the softmax's vector-Jacobian product."""
    return b.sub_((a * b).sum(1, keepdim=True)).mul_(a)


def _pull(rows: Tensor, delta: Tensor, c: Tensor) -> Tensor:
    r""":math:`\sum_u r_u \delta_{uj} (v_u - c_j)`: (P, k, d) from ``rows`` (P, 1 + d, m), each
    point's factor :math:`r_u` over its coordinates times it, :math:`(r_u, r_u v_u)`, in one
    product ``rows @ delta^T`` (both operands along the points in memory, :meth:`_Points.sums`)."""
    r = torch.bmm(rows, delta.transpose(1, 2))  # (P, 1 + d, k)
    return r[:, 1:].transpose(1, 2) - c * r[:, :1].transpose(1, 2)


def _unweighted_pull(delta: Tensor, xs: Tensor, c: Tensor) -> Tensor:
    r""":math:`\sum_u \delta_{uj} (v_u - c_j)` for points ``xs`` (P, d, m) counted once (as
    :meth:`_Points.sums`, with ``sum``'s more accurate cascade over many points)."""
    return torch.bmm(delta, xs.transpose(1, 2)) - c * delta.sum(2, keepdim=True)


def _round_backward(points: _Points, step: _Round, U: Tensor,
                    two_over_tau: Tensor | float, inv_tau: Tensor | float, shared: Tensor,
                    fold_g: Tensor | None = None, ran: Tensor | None = None) -> Tensor:
    """One round back: add the round's shared part to ``shared`` (P, d, U) in place and
    return ``dL/dc`` on its starting centroids through the logits (P, k, d). ``fold_g``: the
    per-point loss gradient (counts of 1 only), whose local part is folded into the same
    ``delta``. ``ran``: a device flag, False for a round that did not run (it adds nothing)."""
    H = torch.where(step.live, U / step.mass, 0.0)  # (P, k, d)
    if ran is not None:
        H = torch.where(ran, H, 0.0)
    if fold_g is None:
        to_c = _round_backward_by_loop(points, step, H, two_over_tau, inv_tau, shared)
        if to_c is not None:
            return to_c
    bias = (H * step.c_new).sum(-1, keepdim=True)  # (P, k, 1)
    c_scaled = (step.c * two_over_tau).transpose(1, 2)  # (P, d, k)
    to_c = torch.zeros_like(step.c)
    for s in points.parts():
        xs = points.xt[:, :, s]
        a = step.attention(points, s, inv_tau)
        if xs.shape[1] == 1:  # scalars: elementwise (a product over d = 1 is slower)
            b = torch.sub(xs, step.c_new).mul_(H)  # H_j (v_u - c'_j)
            if fold_g is not None:
                b.addcmul_(step.c_new, fold_g[:, :, s])  # + g_u c'_j
        else:
            b = torch.baddbmm(bias, H, xs, beta=-1.0)  # H_j . (v_u - c'_j)
            if fold_g is not None:
                b.baddbmm_(step.c_new, fold_g[:, :, s])  # + g_u . c'_j
        delta = _delta(a, b)
        part = torch.bmm(H.transpose(1, 2), a)  # through c' = sum w A v / m
        part.baddbmm_(c_scaled, delta)  # through the logits
        shared[:, :, s] += part
        to_c += points.pull(s, delta, step.c)
    return to_c.mul_(two_over_tau)


def _core_loops(points: _Points, step: _Round, upstream: Tensor) -> native.Kernels | None:
    """The core's C loops (:mod:`.native`) where they take this backward: scalar points with
    counts, float32 on the CPU (not under a tracer), and an ``upstream`` gradient that autograd
    does not record (``create_graph=True``: the PyTorch ops then run, as the loops' results
    have no graph); checked against the PyTorch ops at their first use
    (:func:`check_core_loops`). ``None``: the PyTorch ops."""
    if (points.rows is None or points.xt.shape[1] != 1 or points.xt.dtype != torch.float32
            or upstream.dtype != torch.float32):
        return None
    loops = native.loops_for(points.xt, step.c, upstream)
    if loops is not None and not loops.core_checked:
        check_core_loops(loops)
    return loops if loops is not None and loops.core_agrees else None


def check_core_loops(loops: native.Kernels) -> None:
    """The core's backward loops against the core's own PyTorch path, once per loaded
    library: the unrolled backward of a small batch (two rounds, a masked centroid, chunks of
    20 points: strided views of the kept attention and tails past the loops' 16 lanes) with
    the loops and with ``core_agrees`` off. They agree up to summation order, so to a
    tolerance; where they do not, :meth:`~.native.Kernels.refuse_core`. Every tensor is
    float32 on the CPU, whatever the process's defaults."""
    loops.core_checked = True
    cpu = {"dtype": torch.float32, "device": "cpu"}
    generator = torch.Generator().manual_seed(0)
    P, U, k, chunk = 2, 37, 5, 20
    xt = torch.randn(P, 1, U, generator=generator, **cpu)
    counts = torch.randint(1, 9, (P, U), generator=generator).to(**cpu)
    c0 = torch.sort(torch.randn(P, k, 1, generator=generator, **cpu), dim=1).values
    inv_tau = torch.tensor([3.0, 0.5], **cpu).reshape(P, 1, 1)
    mask = torch.ones(P, k, 1, dtype=torch.bool, device="cpu")
    mask[1, -1] = False
    G = torch.randn(P, 1, U, generator=generator, **cpu)
    _, _, trajectory = weighted_dkm(xt, counts, c0, inv_tau, max_iter=2, epsilon=0.0,
                                    chunk=chunk, centroid_mask=mask)

    def backward() -> tuple[Tensor, Tensor]:
        shared, b = weighted_dkm_gradient(xt, counts, trajectory, G, inv_tau, chunk=chunk,
                                          centroid_mask=mask)
        assert b is not None
        return shared, b

    got = backward()
    loops.core_agrees = False  # the same backward on the PyTorch ops
    try:
        want = backward()
    finally:
        loops.core_agrees = True
    differ = [name for name, g, w in zip(("shared part", "local part"), got, want, strict=True)
              if not torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))]
    if differ:
        loops.refuse_core(", ".join(differ))


def _per_palette(value: Tensor | float, P: int) -> Tensor:
    """``value`` (a float, a 0-dim tensor or one per palette (P, 1, 1)) as (P,) float32."""
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1).expand(P).contiguous()


def _by_chunks(points: _Points, step: _Round, inv_tau: Tensor | float,
               call: Callable[[Tensor, slice], _R | None]) -> list[_R] | None:
    """``call(attention, chunk)`` on every chunk of the points: the results, or ``None`` where
    the loop does not take the first chunk (a later refusal is an error: the chunks before
    have written into the caller's output, which the PyTorch ops would add to again)."""
    results: list[_R] = []
    for s in points.parts():
        out = call(step.attention(points, s, inv_tau), s)
        if out is None:
            if results:
                raise RuntimeError("a core loop took one chunk of the points and not the next")
            return None
        results.append(out)
    return results or None


def _total(parts: Iterable[Tensor]) -> Tensor:
    """The chunks' partial sums added in chunk order."""
    return functools.reduce(torch.add, parts)


def _round_backward_by_loop(points: _Points, step: _Round, H: Tensor,
                            two_over_tau: Tensor | float, inv_tau: Tensor | float,
                            shared: Tensor) -> Tensor | None:
    """:func:`_round_backward` (without ``fold_g``) as one C loop per chunk
    (``Kernels.round_backward``): the values of the PyTorch ops up to summation order, in
    one read of the attention instead of some ten passes over it; ``None`` where the loops
    do not take it."""
    loops = _core_loops(points, step, H)
    if loops is None:
        return None
    P, k, _ = step.c.shape
    c, c_new, h = (v.reshape(P, k).contiguous() for v in (step.c, step.c_new, H))
    t = _per_palette(two_over_tau, P)
    parts = _by_chunks(points, step, inv_tau, lambda a, s: loops.round_backward(
        a, points.xt[:, 0, s], points.rows[:, :, s], c, c_new, h, t, shared[:, 0, s]))
    return None if parts is None else _total(parts).unsqueeze(-1)


def _local_by_loop(points: _Points, step: _Round, G: Tensor, two_over_tau: Tensor | float,
                   inv_tau: Tensor | float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(U, local, dL/dc)``: the loss gradient of the final centroids and :func:`_local`
    (``per_copy``) as one C loop per chunk (``Kernels.local_backward``), the values of the
    PyTorch ops up to summation order; ``None`` where the loops do not take it."""
    loops = _core_loops(points, step, G)
    if loops is None:
        return None
    P, k, _ = step.c.shape
    c, c_new = (v.reshape(P, k).contiguous() for v in (step.c, step.c_new))
    t = _per_palette(two_over_tau, P)
    local = torch.empty_like(points.xt)

    def call(a: Tensor, s: slice) -> tuple[Tensor, Tensor, Tensor] | None:
        out = loops.local_backward(a, points.xt[:, 0, s], G[:, 0, s], c, c_new, t)
        if out is not None:
            local[:, 0, s] = out[0]
        return out

    parts = _by_chunks(points, step, inv_tau, call)
    if parts is None:
        return None
    return (_total(p[2] for p in parts).unsqueeze(-1), local,
            _total(p[1] for p in parts).unsqueeze(-1))


def _local(points: _Points, step: _Round, G: Tensor, per_copy: bool,
           two_over_tau: Tensor | float, inv_tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """The local part of the output's attention: per point (P, d, U), and ``dL/dc`` on the
    last round's starting centroids (P, k, d). ``per_copy`` (scalar points with counts): the
    coefficient :math:`b_u` of each copy's own gradient, the centroid term from ``G``."""
    local = torch.empty_like(points.xt)
    to_c = torch.zeros_like(step.c)
    c_scaled = (step.c * two_over_tau).transpose(1, 2)
    for s in points.parts():
        xs = points.xt[:, :, s]
        a = step.attention(points, s, inv_tau)
        if per_copy:  # B_uj = c'_j (g = 1): delta = A (c'_j - y_u); copies scale it by G_u
            y = torch.bmm(step.c_new.transpose(1, 2), a)  # (P, 1, m)
            delta = (step.c_new - y).mul_(a)
        else:
            delta = _delta(a, torch.bmm(step.c_new, G[:, :, s]))  # B = g_u . c'_j
        local[:, :, s] = torch.bmm(c_scaled, delta)
        if per_copy:  # sum_u G_u delta_uj (v_u - c_j): the rows (G_u, G_u v_u) times delta
            to_c += _pull(torch.cat((G[:, :, s], xs * G[:, :, s]), 1), delta, step.c)
        else:
            to_c += _unweighted_pull(delta, xs, step.c)
    return local, to_c.mul_(two_over_tau)


def weighted_dkm_gradient(xt: Tensor, counts: Tensor | None, trajectory: Trajectory,
                          G: Tensor, inv_tau: Tensor | float, *, chunk: int = DEFAULT_CHUNK,
                          implicit: bool = False, check_errors: bool = True,
                          centroid_mask: Tensor | None = None
                          ) -> tuple[Tensor, Tensor | None]:
    """The backward of the module docstring for the loss gradient ``G`` (P, d, U) of the soft
    points (summed over each point's copies).

    Returns ``(gradient, b)``. With ``counts=None``: the gradient of every point, and
    ``None``. With counts (scalar points only): the shared part ``s`` of every copy's gradient
    and the coefficient ``b`` (P, 1, U) of its own loss gradient: copy ``i`` of point ``u`` gets
    ``s_u + b_u g_i``. ``check_errors=False`` (implicit only) skips the solve's singularity
    check, a host read. ``centroid_mask``: the forward's.
    """
    points = _Points(xt, counts, chunk, centroid_mask)
    two_over_tau = 2.0 * inv_tau
    final = _Round(trajectory, trajectory.round(0))
    per_copy = counts is not None
    if per_copy and xt.shape[1] != 1:
        raise ValueError(f"weighted points must be scalars; got d={xt.shape[1]}")
    by_loop = _local_by_loop(points, final, G, two_over_tau, inv_tau) if per_copy else None
    if by_loop is not None:
        U, local_part = by_loop[0], by_loop[1:]
    else:
        U = torch.zeros_like(final.c.transpose(1, 2))  # U_j = sum_u A_uj G_u, final centroids
        for s in points.parts():  # as G @ A^T: both operands along the points in memory
            U.baddbmm_(G[:, :, s], final.attention(points, s, inv_tau).transpose(1, 2))
        U = U.transpose(1, 2)
        local_part = None
    shared = torch.zeros_like(xt)
    if implicit:
        local, through_output = local_part or _local(points, final, G, per_copy, two_over_tau,
                                                     inv_tau)
        w = _adjoint(points, final, U + through_output, two_over_tau, inv_tau, check_errors)
        _round_backward(points, final, w, two_over_tau, inv_tau, shared)
        return (shared, local) if per_copy else (shared.add_(local), None)
    b = through_output = None
    if per_copy:
        b, through_output = local_part or _local(points, final, G, True, two_over_tau, inv_tau)
    rounds = trajectory.masses.shape[0]
    for back in range(rounds):  # round i: c_i -> c_{i+1}
        step, ran = final, None
        if back and trajectory.ran is not None:  # every palette ran as many rounds
            step = _Round(trajectory, trajectory.round(back))
        elif back:
            # Palettes that ran different numbers of rounds: after each one's last round (the
            # final above), the rounds are walked down together, each as a view, and a palette
            # takes part in round i only below its last (a device flag): the rounds each palette
            # walks, in its order, without gathering every round's attention per palette.
            i = rounds - 1 - back
            step = _Round(trajectory, i)
            ran = (trajectory.last - 1 > i).reshape(-1, 1, 1)
        to_c = _round_backward(points, step, U, two_over_tau, inv_tau, shared,
                               G if back == 0 and not per_copy else None, ran)
        U_next = to_c + torch.where(step.live, 0.0, U)  # an empty cluster passes U on
        if through_output is not None and back == 0:
            U_next = U_next + through_output
        U = U_next if ran is None else torch.where(ran, U_next, U)
    return shared, b


def _adjoint(points: _Points, step: _Round, r: Tensor,
             two_over_tau: Tensor | float, inv_tau: Tensor | float, check_errors: bool
             ) -> Tensor:
    """Solve :math:`(I - J^\\top) w = r` (module docstring) for ``r`` (P, k, d). An empty
    cluster's centroid is carried over unchanged and nothing depends on it: its rows and
    columns are the identity and its component 0."""
    P, k, d = step.c.shape
    M = step.c.new_zeros(P, k, d, k, d)
    D = step.c.new_zeros(P, k, d, d)
    for s in points.parts():
        xs = points.xt[:, :, s]  # (P, d, m)
        a = step.attention(points, s, inv_tau)  # (P, k, m)
        to_new = (xs.unsqueeze(1) - step.c_new.unsqueeze(-1)).mul_(a.unsqueeze(2))  # A(v-c')
        to_old = xs.unsqueeze(1) - step.c.unsqueeze(-1)  # (P, k, d, m): v - c
        if points.counts is not None:
            to_old = to_old * points.counts[:, None, None, s]
        D += torch.einsum("pjam,pjbm->pjab", to_new, to_old)
        M += torch.einsum("pjam,plbm->pjalb", to_new, to_old * a.unsqueeze(2))
    per_palette = two_over_tau.reshape(-1, 1) if isinstance(two_over_tau, Tensor) else two_over_tau
    scale = (per_palette / step.mass.squeeze(-1)).reshape(P, k, 1, 1, 1)
    # D_j on the diagonal blocks (j, j) of the (P, k, d, k, d) matrix, 0 elsewhere
    block_diagonal = D.unsqueeze(3) * torch.eye(k, dtype=D.dtype, device=D.device).reshape(
        1, k, 1, k, 1)
    J = ((block_diagonal - M) * scale).reshape(P, k * d, k * d)
    eye = torch.eye(k * d, dtype=J.dtype, device=J.device)
    dead = (~step.live).expand(P, k, d).reshape(P, k * d)
    system = torch.where(dead.unsqueeze(1) | dead.unsqueeze(2), eye, eye - J.transpose(1, 2))
    rhs = torch.where(dead, 0.0, r.reshape(P, k * d)).unsqueeze(-1)
    if check_errors:
        solution = torch.linalg.solve(system, rhs)
    else:
        solution = torch.linalg.solve_ex(system, rhs, check_errors=False)[0]
    return solution.reshape(P, k, d)


Gradient = Literal["unrolled", "implicit"]
#: The gradients every step offers: through every round, or IDKM's at the fixed point.
GRADIENTS: tuple[str, ...] = get_args(Gradient)


def check_gradient(gradient: str, implementation: str, where: str = "DKM") -> None:
    """``gradient`` is one of :data:`GRADIENTS`, and ``"implicit"`` comes with an implementation
    that computes it: every step built on this core (``"auto"``, ``"unique"``, ``"chunked"``),
    not the plain-autograd ``"reference"``. Else a ValueError naming ``where``."""
    if gradient not in GRADIENTS:
        raise ValueError(f"{where}: gradient must be one of {GRADIENTS}; got {gradient!r}")
    if gradient == "implicit" and implementation == "reference":
        raise ValueError(
            f"{where}: gradient='implicit' is computed by the weighted core, which the "
            f"'reference' step (plain autograd) does not use; got implementation='reference' "
            f"(use 'auto', 'unique' or 'chunked')"
        )


def save_trajectory(ctx, trajectory: Trajectory, *tensors: Tensor,
                    inv_tau: Tensor | float) -> None:
    """Save ``tensors``, a trajectory and ``inv_tau`` on an autograd ``ctx`` (tensors through
    ``save_for_backward``, so saved-tensor hooks see them; Python numbers as attributes)."""
    extra = [t for t in (trajectory.kept, inv_tau) if isinstance(t, Tensor)]
    ctx.save_for_backward(*tensors, trajectory.centroids, trajectory.masses, trajectory.last,
                          *extra)
    ctx.saved_layout = (
        len(tensors),
        trajectory.ran,
        trajectory.kept is not None,
        None if isinstance(inv_tau, Tensor) else inv_tau,
        trajectory.last_only,
    )


def load_trajectory(ctx) -> tuple[Trajectory, tuple[Tensor, ...], Tensor | float]:
    """What :func:`save_trajectory` saved: ``(trajectory, tensors, inv_tau)``."""
    count, ran, has_kept, inv_tau, last_only = ctx.saved_layout
    saved = list(ctx.saved_tensors)
    tensors, (centroids, masses, last), rest = (saved[:count], saved[count:count + 3],
                                                saved[count + 3:])
    kept = rest.pop(0) if has_kept else None
    if inv_tau is None:
        inv_tau = rest.pop(0)
    return Trajectory(centroids, masses, last, kept, ran, last_only), tuple(tensors), inv_tau
