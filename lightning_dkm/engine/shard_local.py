r"""Shard-local DKM under FSDP2: each rank clusters its own shard, FSDP2 gathers soft weights.

Under FSDP2 (``fully_shard``) a clustered weight's trainable original is a ``DTensor``; each rank
holds some rows (its *shard*). Clustering the gathered weight inside the unit's forward costs
every rank ``O(n)`` per weight whatever the world size. Here the ``"unique"`` DKM step
(:mod:`.distinct`) is split along what it does per weight and what it does per distinct value:

**Forward, at the start of an optimizer step** (:meth:`ShardLocalDKM.soften`). For every weight:
the centre and the standard deviation from an all-reduce of the shards' sums (one collective
for all weights), the float16 codes of the rank's shard (:func:`~.float16_codes.encode`,
elementwise: the codes of a shard are those of the whole weight) and their per-code counts.
The counts are summed on the weight's *owner* rank (``dist.reduce``, integers: exact), which
runs DKM on the distinct values of the whole weight (:func:`~.weighted.weighted_dkm`, as the
gathered ``"unique"`` step does) and sends every rank the soft value of each code and the new
centroids (``dist.broadcast``: the same bits everywhere). Each rank writes the soft values of
its shard's codes into the sharded parameter in place, keeping the raw shard aside; FSDP2's
all-gathers then send soft weights, and the parametrization's forward is the identity
(:attr:`~.parametrization.DKMParametrization.presoftened`).

**Backward, before the optimizer step** (:meth:`ShardLocalDKM.finish`). FSDP2 has
reduce-scattered (averaged over ranks, accumulated over micro-batches) the gradient
:math:`g_i` of each soft weight into the shard's ``.grad``. DKM's gradient of weight ``i`` with
value ``u`` is :math:`s_u + b_u g_i` (:mod:`.distinct`), with ``s`` linear in the per-code sums
:math:`G_u = \sum_{i: u} g_i` of the whole weight, ``b`` independent of ``g``: each rank sums its
shard's gradient per code, the sums reach the owner (``dist.reduce``), the owner computes
``s`` and ``b`` (:func:`~.weighted.weighted_dkm_gradient` on what its forward kept) and
broadcasts both tables, and each rank replaces its shard's gradient by :math:`s_u + b_u g_i`
and puts the raw shard back. Because ``s`` is linear and the averaging is too, this is the
gradient the gathered path gives (FSDP2 averages :math:`s(G_r) + b g_r` over the ranks ``r``),
up to float summation order.

**Work per rank**: ``O(n / world)`` per weight (codes, counting, look-ups) plus, for the
weights it owns, the DKM iterations on the distinct values (``O(U k max_iter)``, ``U <=
65,536``): the weights are dealt to the ranks by that cost (:func:`owners`). **Communication** per
optimizer step: two small all-reduces (the sums, and whether each weight has a gradient; a
third where the centre needs it), and per weight 65,536 integer counts to its
owner, ``65,536 + k`` floats from it, 65,536 float sums to it and ``2 x 65,536`` floats from
it; one collective per owning rank and kind, not per weight. **Host reads** (syncs on an
accelerator): two per optimizer step, each for all weights at once (which weights need the
centre's fallback, which have a gradient); none per weight (codes counted with ``index_add_``,
the owner's distinct values in the static layout of
:func:`~.float16_codes.static_distinct_from_counts`).

**Memory per rank**: the raw shard aside (``4 n / world`` bytes per float32 weight, from
:meth:`~ShardLocalDKM.soften` to :meth:`~ShardLocalDKM.restore`, or from step to step in a
:class:`RawShards` the caller keeps), a 65,536-entry table of soft values per weight, and on the
owner the trajectory on the distinct values.

**Which weights** (:func:`eligible`): soft-mode, training, initialised parametrizations of the
``"unique"`` step on one palette without per-channel scale (the codes of a row-shard are then
those of its weights, in any order), whose original FSDP2 shards by rows
(``Shard(0)`` on a 1-D mesh). Others (vectors, grouped palettes, ``"chunked"`` /
``"reference"``, ``"hard"`` mode) keep clustering the gathered weight in the forward.

Accumulation: :meth:`ShardLocalDKM.soften` runs DKM once per optimizer step; the micro-batches
after the first write the same soft values again from the kept tables
(:meth:`~ShardLocalDKM.reapply`, one look-up per weight, no DKM), and :meth:`finish` runs DKM's
backward once on the accumulated gradient. Between micro-batches (and whenever validation,
checkpoints or metrics may run) the raw weights are back in place (:meth:`restore`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .float16_codes import (
    CODES,
    CodeColumns,
    DistinctValues,
    encode,
    normalized_distinct,
    power_of_two_unit,
)
from .numerics import autocast_disabled, host_reads_are_free, inverse_temperature
from .parametrization import DKMParametrization
from .sharding import is_sharded
from .weighted import Trajectory, weighted_dkm, weighted_dkm_gradient

__all__ = ["RawShards", "ShardLocalDKM", "eligible", "owners"]


def eligible(p: DKMParametrization, original: Tensor) -> str | None:
    """``None`` when ``p``'s weight can be clustered shard-locally (module docstring), else
    why not (for a warning naming it). Mode and training are the caller's: outside soft
    training there is nothing to do, which needs no warning."""
    if not is_sharded(original):
        return "it is not sharded by FSDP2"
    if p.step_implementation != "unique":
        return f"its DKM step is {p.step_implementation!r} (shard-local needs 'unique')"
    if p.layout.num_palettes != 1 or p.scale is not None or not p.layout.order_free:
        return "it has several palettes or per-channel scales (shard-local needs one palette)"
    from torch.distributed.tensor import Shard

    if original.device_mesh.ndim != 1 or tuple(original.placements) != (Shard(0),):
        return (f"FSDP2 places it as {tuple(original.placements)} on a "
                f"{original.device_mesh.ndim}-D mesh (shard-local needs Shard(0) on a 1-D mesh)")
    shard_device, mesh_device = original.to_local().device.type, original.device_mesh.device_type
    if shard_device != mesh_device:
        return (f"its shard lives on {shard_device} and its mesh on {mesh_device} (FSDP2's CPU "
                "offload): shard-local DKM's collectives would send the shard's tables through "
                f"the {mesh_device} process group")
    return None


def owners(sizes: Sequence[int], world: int) -> list[int]:
    """The rank that runs each weight's DKM iterations, for weights of ``sizes`` elements:
    the weights dealt by the cost of their iterations, ``O(U k max_iter)`` with ``U <=
    min(n, 65,536)`` distinct values (the bound stands for ``U``, known only after counting),
    largest first, each to the rank with the least so far (ties: the lower size rank, then the
    lowest rank). The same on every rank (it depends on the sizes only). Dealing by ``n``
    instead would give one rank the largest weight and little else, though its iterations
    cost no more than a 65,536-weight matrix's."""
    costs = [min(n, CODES) for n in sizes]
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-costs[i], -sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += costs[i]
    return out


@dataclass
class _Owned:
    """What the owner of a weight keeps from DKM's forward for its backward."""

    distinct: DistinctValues  # the distinct values (normalised), their counts and codes
    trajectory: Trajectory
    inv_tau: Tensor | float


@dataclass
class _Weight:
    """One shard-locally clustered weight over an optimizer step."""

    name: str
    p: DKMParametrization
    original: nn.Parameter  # the FSDP2-sharded original (a DTensor)
    owner: int  # rank in the mesh's group
    center: Tensor  # (1, 1) float32
    unit: Tensor  # (1, 1) float32, a power of two
    table: Tensor | None = None  # (65536,) the soft value of each code, in weight units
    raw: Tensor | None = None  # the raw shard while the parameter holds soft values
    owned: _Owned | None = None

    def local(self) -> Tensor:
        """This rank's rows of the original (FSDP2's storage: writes reach the all-gather)."""
        return self.original.to_local()

    def codes(self) -> CodeColumns:
        """The float16 codes of the raw shard, as the whole weight's codes would be."""
        source = self.local() if self.raw is None else self.raw
        x = source.detach().reshape(1, -1).to(torch.float32)
        codes = encode(x, self.center, self.unit)
        return CodeColumns(codes, device_side=not host_reads_are_free(codes))


class RawShards:
    """The memory each weight's raw shard is kept in while its parameter holds soft values,
    reused from one optimizer step to the next until :meth:`release` (on the CPU).

    A fresh copy per step pays its first touches every step on the CPU (glibc hands blocks
    this large back to the system when they are freed): on GPT-2 small's 85M clustered
    weights keeping it made the hooks 0.06-0.14 s cheaper per step at world 1 and 2 (of
    0.8-1.4 s; ``benchmarks/perf_distributed.py``). Kept, ``4 n / world`` bytes per float32
    weight stay taken between steps too: the callback releases them at every epoch's end, at
    the fit's end and on an exception. An accelerator's caching allocator reuses a freed
    copy's memory by itself, so a shard there gets a fresh copy each time and nothing is kept.
    Keyed by the parameter (not its name): two models' steps that share one
    :class:`RawShards` keep apart."""

    def __init__(self) -> None:
        # id(parameter) -> (a weak reference to it, its memory); a parameter that is gone
        # lets its memory go at the next new one (its id may then be another's)
        self._kept: dict[int, tuple[weakref.ref, Tensor]] = {}

    def __len__(self) -> int:
        """How many weights have memory kept."""
        return len(self._kept)

    def copy(self, parameter: Tensor, shard: Tensor) -> Tensor:
        """``shard``'s values (``parameter``'s rows on this rank) in the memory kept for
        ``parameter``: taken on first use, and again where the shard's shape, dtype or device
        changed; a fresh copy off the CPU."""
        if shard.device.type != "cpu":
            return shard.clone(memory_format=torch.contiguous_format)
        entry = self._kept.get(id(parameter))
        kept = None if entry is None or entry[0]() is not parameter else entry[1]
        if (kept is None or kept.shape != shard.shape or kept.dtype != shard.dtype
                or kept.device != shard.device):
            if entry is None:  # a new parameter: forget those that are gone
                self._kept = {k: v for k, v in self._kept.items() if v[0]() is not None}
            kept = torch.empty_like(shard, memory_format=torch.contiguous_format)
            self._kept[id(parameter)] = (weakref.ref(parameter), kept)
        return kept.copy_(shard)

    def release(self) -> None:
        """Let the memory go (the next :meth:`copy` takes it again)."""
        self._kept.clear()


class ShardLocalDKM:
    """The shard-local DKM of one optimizer step (module docstring): :meth:`soften` at its
    first micro-batch, :meth:`reapply` at the others, :meth:`restore` after each,
    :meth:`finish` before the optimizer step. ``weights``: ``(name, parametrization,
    sharded original)`` of the eligible weights, all on one mesh. ``raw_shards``: where the
    raw shards are kept aside, reused across steps (:class:`RawShards`); without one, a fresh
    copy each time."""

    def __init__(self, weights: Iterable[tuple[str, DKMParametrization, nn.Parameter]],
                 raw_shards: RawShards | None = None) -> None:
        members = list(weights)
        if not members:
            raise ValueError("ShardLocalDKM needs at least one weight")
        mesh = members[0][2].device_mesh
        if any(o.device_mesh != mesh for _, _, o in members):
            raise ValueError("ShardLocalDKM: the weights must share one device mesh; got "
                             f"{sorted({str(o.device_mesh) for _, _, o in members})}")
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        ranks = owners([o.numel() for _, _, o in members], world)
        self._sources = [dist.get_global_rank(self.group, r) for r in range(world)]
        self.weights: list[_Weight] = []
        for (name, p, original), owner, (center, unit) in zip(
                members, ranks, self._normalizations([o for _, _, o in members]), strict=True):
            self.weights.append(_Weight(name, p, original, owner, center, unit))
        self.softened = False
        self.raw_shards = raw_shards

    def _normalizations(self, originals: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Each weight's centre and power-of-two unit (1, 1) from one all-reduce of its shards'
        sums and sums of squares (float32 passes, float64 arithmetic after; the squares in
        float64 where float32 overflows or cancels). The unit only
        needs the standard deviation within a factor of ~1.4 (:func:`~.float16_codes.encode`);
        where ``E[x^2] - E[x]^2`` cancels badly (a mean far larger than the spread) the sums of
        squared deviations are all-reduced as well, as :mod:`.float16_codes` falls back to
        them (the same decision on every rank: it reads the all-reduced sums; that flag per
        weight, read once for all weights, is the one host read here)."""
        shards = [o.to_local().detach() for o in originals]
        # float32 passes whatever the shards' dtype: a float16 shard's own sum overflows at
        # 65,504, and a bfloat16 one keeps 8 bits
        sums = torch.stack([torch.stack([
            s.sum(dtype=torch.float32),
            torch.linalg.vector_norm(s, dtype=torch.float32).square()]) for s in shards]).double()
        dist.all_reduce(sums, group=self.group)
        sizes = torch.tensor([o.numel() for o in originals], dtype=torch.float64,
                             device=sums.device)
        mean, mean_square = sums[:, 0] / sizes, sums[:, 1] / sizes
        variance = mean_square - mean.square()
        cancels = ((variance < 1e-4 * mean_square) | ~mean_square.isfinite()).tolist()
        if any(cancels):  # float64 deviations: squares of 1e20 overflow float32
            deviations = torch.stack([
                torch.linalg.vector_norm(s.double() - m.to(s.device)).square() if c
                else s.new_zeros((), dtype=torch.float64) for s, m, c in zip(
                    shards, mean, cancels, strict=True)])
            dist.all_reduce(deviations, group=self.group)
            variance = torch.where(torch.tensor(cancels, device=sums.device),
                                   deviations.to(sums.device) / sizes, variance)
        std = variance.clamp_min(0.0).sqrt()
        return [(m.float().reshape(1, 1).to(s.device),
                 power_of_two_unit(d.float().reshape(1, 1).to(s.device)))
                for s, m, d in zip(shards, mean, std, strict=True)]

    # -- the forward --------------------------------------------------------------------------
    @torch.no_grad()
    def soften(self) -> None:
        """DKM of every weight (its owner's work) and the soft values written into the shards,
        the raw shards kept aside; the parametrizations' forwards become the identity."""
        columns = [w.codes() for w in self.weights]
        counts = [c.sum_per_code().to(torch.int32) for c in columns]
        counts = self._to_owners(counts)
        finals = []
        for w, total in zip(self.weights, counts, strict=True):
            if w.owner == self.rank:
                w.table, final = self._dkm(w, total)
            else:
                w.table = total.new_empty(CODES, dtype=torch.float32)
                final = torch.empty_like(w.p.centroids)
            finals.append(final)
        self._from_owners([(w.table, final) for w, final in zip(self.weights, finals,
                                                                 strict=True)])
        for w, final in zip(self.weights, finals, strict=True):
            w.p.keep_centroids(final)  # where this step started is kept for a replay
        self._write(columns)

    def _dkm(self, w: _Weight, counts: Tensor) -> tuple[Tensor, Tensor]:
        """The owner's DKM on the whole weight's distinct values (as :mod:`.distinct`'s step):
        the soft value per code (65,536) and the final centroids (1, k, 1)."""
        p = w.p
        distinct, scale = normalized_distinct(  # as the gathered step does on this device
            counts.to(torch.long), 1, w.original.numel(), w.unit, w.center, None,
            not host_reads_are_free(counts), torch.float32)
        c0 = ((p.centroids.detach().float().squeeze(-1) - w.center) / scale).unsqueeze(-1)
        inv_tau = inverse_temperature(p.temperature, torch.float32)
        with autocast_disabled(counts.device.type):
            y, c_final, trajectory = weighted_dkm(
                distinct.values.unsqueeze(1), distinct.counts, c0, inv_tau,
                max_iter=p.max_iter, epsilon=p.epsilon, implicit=p.gradient == "implicit")
        w.owned = _Owned(distinct, trajectory, inv_tau)
        table = distinct.to_dense(y[:, 0, :] * scale + w.center)
        final = (c_final[:, :, 0] * scale + w.center).unsqueeze(-1)
        return table, final.to(p.centroids.dtype)

    def _write(self, columns: list[CodeColumns]) -> None:
        for w, column in zip(self.weights, columns, strict=True):
            local = w.local()
            if w.raw is None:
                w.raw = (local.detach().clone() if self.raw_shards is None
                         else self.raw_shards.copy(w.original, local.detach()))
            target = local.detach().view(1, -1)
            if target.dtype == w.table.dtype:
                column.look_up(w.table, out=target)  # straight into FSDP2's storage
            else:
                target.copy_(column.look_up(w.table))
            w.p.presoftened = True
        self.softened = True

    @torch.no_grad()
    def reapply(self) -> None:
        """Write the soft values again (a later micro-batch of the same optimizer step): the
        kept tables looked up at the raw shards' codes, bit for bit the first write."""
        if not self.softened:
            self._write([w.codes() for w in self.weights])

    @torch.no_grad()
    def restore(self) -> None:
        """Put the raw shards back (the parametrizations cluster in the forward again). Safe
        to call at any time; the step's tables stay for :meth:`reapply` / :meth:`finish`."""
        for w in self.weights:
            if w.raw is not None:
                w.local().detach().copy_(w.raw)
                w.raw = None
            w.p.presoftened = False
        self.softened = False

    # -- the backward -------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        """Restore the raw shards and turn each shard's gradient w.r.t. the soft weights into
        DKM's gradient w.r.t. the raw weights (module docstring). A weight without a gradient
        (no backward ran) is only restored. Collectives: every rank calls it, at the same
        step. The step's state is dropped: the next step starts with :meth:`soften`."""
        self.restore()
        grads = [None if w.original.grad is None else w.original.grad.to_local()
                 for w in self.weights]
        present = [g is not None for g in grads]
        flags = torch.tensor(present, dtype=torch.int32, device=self.weights[0].local().device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        ready = flags.tolist()  # the one host read of the backward, for all weights
        columns = [w.codes() for w in self.weights]
        # float32 also for an empty shard (fewer rows than ranks), whose bincount is int64
        sums = [c.sum_per_code(g.detach().reshape(1, -1).float()).float() if ok else
                torch.zeros(CODES, dtype=torch.float32, device=c.codes.device)
                for c, g, ok in zip(columns, grads, ready, strict=True)]
        sums = self._to_owners(sums)
        tables = []
        for w, total, ok in zip(self.weights, sums, ready, strict=True):
            if w.owner == self.rank and ok:
                tables.append(self._gradient_tables(w, total))
            else:
                tables.append(total.new_empty(2 * CODES, dtype=torch.float32))
        self._from_owners([(t,) for t in tables])
        for w, column, g, t, ok in zip(self.weights, columns, grads, tables, ready,
                                       strict=True):
            if ok and g is not None:
                dkm = column.look_up(t[:CODES], factor=(t[CODES:], g.reshape(1, -1).float()))
                g.copy_(dkm.view(g.shape))
            w.owned, w.table = None, None

    def _gradient_tables(self, w: _Weight, per_code: Tensor) -> Tensor:
        """The owner's ``s`` and ``b`` per code (2 x 65,536) for the whole weight's per-code
        gradient sums."""
        owned = w.owned
        assert owned is not None, f"{w.name}: finish() before soften()"
        distinct = owned.distinct
        G = distinct.from_dense(per_code).unsqueeze(1)  # (1, 1, U)
        with autocast_disabled(per_code.device.type):
            shared, b = weighted_dkm_gradient(
                distinct.values.unsqueeze(1), distinct.counts, owned.trajectory, G,
                owned.inv_tau, implicit=w.p.gradient == "implicit",
                check_errors=host_reads_are_free(per_code))
        assert b is not None
        return torch.cat([distinct.to_dense(shared[:, 0, :]), distinct.to_dense(b[:, 0, :])])

    # -- communication ------------------------------------------------------------------------
    def _to_owners(self, tables: list[Tensor]) -> list[Tensor]:
        """Each weight's table summed over the ranks, on its owner (one ``reduce`` per owning
        rank, carrying all its weights' tables); other ranks get their own table back."""
        out = list(tables)
        for rank, source in enumerate(self._sources):
            mine = [i for i, w in enumerate(self.weights) if w.owner == rank]
            if not mine:
                continue
            flat = torch.cat([tables[i] for i in mine])
            dist.reduce(flat, dst=source, group=self.group)
            if rank == self.rank:
                for i, part in zip(mine, flat.split([tables[i].numel() for i in mine]),
                                   strict=True):
                    out[i] = part
        return out

    def _from_owners(self, parts: list[tuple[Tensor, ...]]) -> None:
        """Copy each weight's tensors from its owner into every rank's, in place (one
        ``broadcast`` per owning rank): the same bits on every rank."""
        for rank, source in enumerate(self._sources):
            mine = [t for w, ts in zip(self.weights, parts, strict=True) if w.owner == rank
                    for t in ts]
            if not mine:
                continue
            flat = torch.cat([t.reshape(-1).float() for t in mine])
            dist.broadcast(flat, src=source, group=self.group)
            if rank != self.rank:
                for t, part in zip(mine, flat.split([t.numel() for t in mine]), strict=True):
                    t.copy_(part.view(t.shape))
