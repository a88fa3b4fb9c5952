"""One forward pass of a clustered model: every weight clustered once, the DKM of all of them
in as few calls as their settings allow.

The DKM step's cost has a fixed part per tensor (a chain of ~100 small ops per round) that a
model with many clustered tensors pays once per tensor and step. Inside
:func:`clustering_pass` the first read of a clustered weight in soft training mode runs the
``"unique"`` step of *every* such weight of the model in one call of the weighted core
(:func:`~.distinct.unique_dkm_batch`: their palettes padded into one batch), and every other
read in the pass gets its result; the pass also holds ``torch.nn.utils.parametrize.cached()``,
so a weight read twice in one forward (tied weights, a module called twice) is clustered once.
A small scalar weight that ``implementation="auto"`` gives the ``"chunked"`` step (a palette of
fewer than 16,384 weights, whose own call would be mostly the ``"unique"`` step's fixed cost)
joins that batch on its float16 codes, as a ``"unique"`` weight does: in the batch that cost
is shared, and its distinct values are fewer than its weights (the digits CNN's 5,120-weight
head took 1.2 ms of a 2-bit batch in a call of its own; as 5,120 exact points it widened the
4-bit batch from 4,098 columns to 5,120 and cost 1.1-2.6 ms of the step more than on its
codes, ``benchmarks/perf_dkm_steady.py``). One given the ``"chunked"`` step by name joins on
its exact weights, each its own point of count 1 (``unique_dkm_batch``'s ``exact``): the
values of its own step up to float summation order. Where no weight of the pass runs
``"unique"`` by its own setting, each runs its own step. Weights on other steps
(``"reference"``, vectors, larger ``"chunked"`` ones), in ``"hard"`` or ``"dense"`` mode, in
``eval()``, or too large to gain on CPU (below) are computed per tensor as outside a pass.

**When batching pays.** On an accelerator every op costs a launch, so every such weight is
batched. On CPU a batch pays for small and middling tensors, whose fixed cost dominates;
large ones run as fast or faster alone (their temporaries stay in cache). Measured here with
``python benchmarks/perf_batch.py --clock cpu --threads 1`` (``unique``, forward and backward
of 24 / 12 / 6 tensors): 16,384 weights each at k = 4 43.9 ms batched vs 69.0 ms alone, at
k = 16 72.4 vs 84.0 ms; 65,536 weights at k = 16 48.1 vs 57.4 ms; 262,144 weights 40.9 vs
42.1 ms (12 tensors of 589,824 weights: slower batched). So on CPU a weight joins the batch
while ``P x n x k <= CPU_BATCH_MAX_ENTRIES`` (2^20), and larger ones run alone, except in a
small model: where all the pass's batchable weights together have ``P x n x k <=
CPU_BATCH_MAX_TOTAL`` (2^24) they are one batch, whatever their sizes. The digits CNN at 2 bits
(73,728, 294,912 and 524,288 weights, k = 4: 3.6 x 10^6 entries) took 17.1 / 15.5 / 13.0 ms
per forward and backward of its soft weights as one batch against 18.8 / 17.1 / 14.5 ms by
the per-weight rule (0.89-0.91; ``python benchmarks/perf_batch.py --digits-cnn --bits 2
--repeats 60 --clock cpu --threads 1``, the two alternating step by step, three runs); at 3
bits 0.88-0.94 and at 4 bits (14.3 x 10^6 entries) 0.94-0.95 (``--bits 3``, ``--bits 4``,
``--repeats 40``, two runs each). At the bound (``--cases 524288:2:16 1048576:4:4
294912:3:16 131072:8:16 589824:2:16 --repeats 7``, two runs): batched 0.81-0.97 of alone,
except four weights of 1,048,576 at k = 4 (1.02 both times). A large model's weights are far
above the total and keep the per-weight rule. (Before the
codes' even grid and the attention's floor, #22, batches were slower from 16,384 weights at
k = 16 on, and the bound was 2^16 entries of ``P x min(n, 65536) x k``.)

Tensors are batched together only when their step settings agree (``max_iter``, ``epsilon``,
``gradient``, device, dtype); each group is one call, in which every tensor still stops early on its
own, so every result equals the tensor's own call (up to float summation order). Every
clustered weight of the model is clustered on the first read, also one that this forward
does not read: for a model that uses only part of its weights per step (alternating
sub-models), open the pass on the part that runs. Under FSDP2 a weight is whole only while its
FSDP unit runs (the others are ``DTensor`` shards), so a batch holds the weights of one unit.
Close the pass before the backward (``DKMCallback`` does): what it holds is the forward's.

**Rebuild instead of keep (FSDP2).** For the weights FSDP2 shards (``rebuild=None``, the
default; ``True``: every weight, ``False``: none) the pass keeps neither the soft weights nor
the float16 codes of a ``"unique"`` step between the forward and the backward, but computes
them again in the backward (:mod:`.rebuild`). Weights with ``per_channel_scale`` or several
palettes keep theirs (their step input is a copy, not a view of the weight).

**Who calls whom**: the step-flow table of ``docs/architecture.md`` ("How one step flows").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distinct import unique_dkm_batch
from .numerics import DKMOutput
from .parametrization import AUTO_UNIQUE_MIN_WEIGHTS, DKMParametrization, StepConfig
from .rebuild import SavedSoftWeights
from .sharding import is_sharded

__all__ = ["CPU_BATCH_MAX_ENTRIES", "CPU_BATCH_MAX_TOTAL", "ClusteringPass", "clustering_pass",
           "pass_members"]

#: On CPU a weight joins the pass's batch while ``P x n x k`` (its weights times centroids) is
#: no larger than this (module docstring); on an accelerator every one does.
CPU_BATCH_MAX_ENTRIES = 1 << 20
#: ... or while the ``P x n x k`` of all the pass's batchable weights together is no larger
#: than this (a small model: one batch of them all; module docstring).
CPU_BATCH_MAX_TOTAL = 1 << 24


class ClusteringPass:
    """The weights of one forward: each :class:`DKMParametrization` of the model with the
    parametrization list that holds its original (:attr:`members`), and the results computed so
    far."""

    def __init__(self, members: list[tuple[DKMParametrization, nn.Module]],
                 rebuild: bool | None = None) -> None:
        self.members = members
        self._results: dict[int, DKMOutput] = {}
        self._unread: dict[int, DKMParametrization] = {}
        self.saved = SavedSoftWeights()
        # Decided outside the forward, where a weight FSDP2 shards is still a DTensor.
        self._rebuilding = {
            id(p) for p, holder in members if p.layout.order_free and p.scale is None
            and (rebuild if rebuild is not None else is_sharded(holder.original))
        }
        # :meth:`_small_model`, once known; never under FSDP2, whose batches are per unit
        self._small: bool | None = (
            False if any(is_sharded(holder.original) for _, holder in members) else None)

    def rebuilds(self, p: DKMParametrization) -> bool:
        """Whether ``p``'s soft weights are rebuilt in the backward instead of kept (module
        docstring: the weights FSDP2 shards, or all with ``rebuild=True``)."""
        return id(p) in self._rebuilding

    @staticmethod
    def _batchable(p: DKMParametrization, weight: Tensor) -> bool:
        """Whether ``p`` runs the soft ``"unique"`` step on a whole weight (a sharded original:
        FSDP2 gathers it in its own module's forward), or the ``"chunked"`` one on a small
        scalar palette (:func:`_exact_member`)."""
        return (p.mode == "soft" and p.training and p.is_initialized
                and (p.step_implementation == "unique" or _small_chunked(p))
                and not is_sharded(weight))

    def _batches(self, p: DKMParametrization, weight: Tensor) -> bool:
        """Whether ``p``'s soft ``"unique"`` step runs in the pass's batch (module docstring)."""
        if not self._batchable(p, weight):
            return False
        if weight.device.type != "cpu":
            return True
        return _entries(p) <= CPU_BATCH_MAX_ENTRIES or self._small_model()

    def _small_model(self) -> bool:
        """Whether all the pass's batchable weights together are within
        :data:`CPU_BATCH_MAX_TOTAL` (looked at once per pass; never where FSDP2 shards
        weights: a batch there holds one unit's, gathered one unit at a time)."""
        if self._small is None:
            self._small = sum(_entries(q) for q, holder in self.members
                              if self._batchable(q, holder.original)) <= CPU_BATCH_MAX_TOTAL
        return self._small

    def _step(self, p: DKMParametrization, x: Tensor, centroids: Tensor, tau: Tensor,
              config: StepConfig) -> DKMOutput:
        """``p``'s :attr:`~.parametrization.DKMParametrization.pass_step`: on the first request
        of a weight that :meth:`_batches`, the batched step of every member that does with the
        same settings; else ``p``'s own step."""
        group = None
        if id(p) not in self._results and self._batches(p, x):
            group = [(q, x if q is p else q.layout.step_view(holder.original, q.scale))
                     for q, holder in self.members if q is p or (
                         self._batches(q, holder.original)
                         and _settings(q, holder.original) == _settings(p, x))]
            if all(q.step_implementation != "unique" for q, _ in group):  # none to join
                group = None
        if id(p) not in self._results and group is None:
            result = p.step(x, centroids, tau, config._replace(rebuild=self.rebuilds(p)))
            self.saved.keep(result)
            return result
        if group is not None:
            exact = [_exact_member(q) for q, _ in group]
            outputs = unique_dkm_batch(
                [t for _, t in group], [q.centroids for q, _ in group],
                [q.temperature for q, _ in group], max_iter=p.max_iter, epsilon=p.epsilon,
                gradient=p.gradient, exact=exact,
                rebuild=[self.rebuilds(q) and not e for (q, _), e in zip(group, exact,
                                                                        strict=True)])
            for (q, _), result in zip(group, outputs, strict=True):
                self._results[id(q)], self._unread[id(q)] = result, q
                self.saved.keep(result)
        self._unread.pop(id(p), None)
        return self._results[id(p)]

    def close(self) -> None:
        """Keep the centroids of batched results that no forward read; nothing else stays."""
        for p in self._unread.values():
            p.keep_centroids(self._results[id(p)].centroids)
        for p, _ in self.members:
            p.pass_step = None
        self._results.clear()
        self._unread.clear()


def _small_chunked(p: DKMParametrization) -> bool:
    """Whether ``p`` runs the ``"chunked"`` step on scalar palettes smaller than
    :data:`~.parametrization.AUTO_UNIQUE_MIN_WEIGHTS`: a batch member (module docstring), on
    its float16 codes where ``implementation="auto"`` chose that step, else on its exact
    weights (:func:`_exact_member`); its rows never widen the batch past the codes' 65,536
    columns."""
    return (p.step_implementation == "chunked" and p.layout.spec.cluster_dim == 1
            and p.layout.palette_shape[1] < AUTO_UNIQUE_MIN_WEIGHTS)


def _exact_member(p: DKMParametrization) -> bool:
    """Whether ``p`` joins a batch on its exact weights (``unique_dkm_batch``'s ``exact``): a
    small scalar weight given the ``"chunked"`` step by name. Its result is its own step's up
    to float summation order."""
    return _small_chunked(p) and p.implementation != "auto"


def _entries(p: DKMParametrization) -> int:
    """``P x n x k`` of ``p``'s palettes: what batching on CPU is bounded by."""
    P, n, _ = p.layout.palette_shape
    return P * n * p.layout.spec.num_centroids


def _settings(p: DKMParametrization, weight: Tensor) -> tuple:
    return p.max_iter, p.epsilon, p.gradient, weight.device, weight.dtype


def pass_members(model: nn.Module) -> list[tuple[DKMParametrization, nn.Module]]:
    """Every :class:`DKMParametrization` of ``model`` (the first of its parametrization list)
    with the list that holds its original: who :func:`clustering_pass` hands a step. Looked up
    once, it serves every pass while the model's parametrizations stay (``members=``)."""
    members = []
    for module in model.modules():
        holders = getattr(module, "parametrizations", None)
        if not isinstance(holders, nn.ModuleDict):
            continue
        for holder in holders.values():
            if isinstance(holder[0], DKMParametrization):
                members.append((holder[0], holder))
    return members


@contextlib.contextmanager
def clustering_pass(model: nn.Module, rebuild: bool | None = None, *,
                    members: list[tuple[DKMParametrization, nn.Module]] | None = None,
                    ) -> Iterator[ClusteringPass]:
    """Run one forward of ``model`` as one clustering pass (module docstring). Nested or
    repeated use is fine; on exit nothing of the pass is kept.

    ``rebuild``: which weights rebuild their soft weights in the backward (module docstring,
    "Rebuild instead of keep"). ``members``: :func:`pass_members` of ``model`` looked up
    before (saves the walk over the model's modules at every pass)."""
    if members is None:
        members = pass_members(model)
    members = [(p, holder) for p, holder in members if p.pass_step is None]
    current = ClusteringPass(members, rebuild)
    for p, _ in members:
        p.pass_step = functools.partial(current._step, p)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(parametrize.cached())
            if current._rebuilding:
                stack.enter_context(current.saved.hooks())
            yield current
    finally:
        current.close()
