"""One forward pass of a clustered model: every weight clustered once, the DKM of all of them
in as few calls as their settings allow.

The DKM step's cost has a fixed part per tensor (a chain of ~100 small ops per round) that a
model with many clustered tensors pays once per tensor and step. Inside
:func:`clustering_pass` the first read of a clustered weight in soft training mode runs the
``"unique"`` step of *every* such weight of the model in one call of the weighted core
(:func:`~.distinct.unique_dkm_batch`: their palettes padded into one batch), and every other
read in the pass gets its result; the pass also holds ``torch.nn.utils.parametrize.cached()``,
so a weight read twice in one forward (tied weights, a module called twice) is clustered once.
Weights on other steps (``"chunked"``, ``"reference"``, vectors), in ``"hard"`` or ``"dense"``
mode, in ``eval()``, or too large to gain on CPU (below) are computed per tensor as outside a
pass.

**When batching pays.** On an accelerator every op costs a launch, so every such weight is
batched. On CPU a batch pays only for small tensors, whose fixed cost dominates; larger ones
run faster alone (their temporaries stay in cache). Measured here with
``python benchmarks/perf_batch.py`` (``unique``, forward and backward of 24 / 12 / 6 tensors):
16,384 weights each at k = 4 74 ms batched vs 86 ms alone, at k = 16 181 vs 133 ms; 65,536
weights 135 vs 99 ms; 262,144 weights 141 vs 83 ms. So on CPU a weight joins the batch while
``P x min(n, 65536) x k <= CPU_BATCH_MAX_ENTRIES`` (2^16), and larger ones run alone.

Tensors are batched together only when their step settings agree (``max_iter``, ``epsilon``,
``gradient``, device); each group is one call, in which every tensor still stops early on its
own, so every result equals the tensor's own call (up to float summation order). Every
clustered weight of the model is clustered on the first read, also one that this forward
does not read: for a model that uses only part of its weights per step (alternating
sub-models), open the pass on the part that runs. Under FSDP2 a weight is whole only while its
FSDP unit runs (the others are ``DTensor`` shards), so a batch holds the weights of one unit.
Close the pass before the backward (``DKMCallback`` does): what it holds is the forward's.

**Recompute instead of keep (FSDP2).** Between the forward and the backward a ``"unique"``
weight normally costs ``6 n`` bytes beyond the model: its soft weights (``n`` floats, which
``F.linear`` saves for the input's gradient) and its float16 codes (which the DKM backward
reads). Under FSDP2 that is the whole model's size on every rank, whatever the world size,
while FSDP2 itself keeps only shards (it frees each gathered weight after its unit's forward
and gathers it again for the backward). So for the weights FSDP2 shards (``recompute=None``,
the default; ``True``: every weight, ``False``: none) the pass keeps neither: the DKM step
saves its input, the gathered weight, which FSDP2 gathers again for the backward anyway, and
computes the codes again from it there; and a saved-tensor hook replaces every saved view of
the soft weights with how to rebuild them (the codes and one look-up in the step's per-code
output table, bit for bit). What stays per weight is that table and the step's trajectory on
the distinct values (``O(U k max_iter)``, ``U <= 65,536``); the price is one more pass over the
weight for the codes and one look-up in the backward. Weights with ``per_channel_scale`` or
several palettes keep theirs (their step input is a copy, not a view of the weight).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.utils import parametrize

from .distinct import unique_dkm_batch
from .parametrization import DKMParametrization
from .sharding import is_sharded

__all__ = ["CPU_BATCH_MAX_ENTRIES", "ClusteringPass", "clustering_pass"]

#: On CPU a weight joins the pass's batch while its attention block, ``P x min(n, 65536) x k``
#: entries at most, is no larger than this (module docstring); on an accelerator every one does.
CPU_BATCH_MAX_ENTRIES = 1 << 16


class ClusteringPass:
    """The weights of one forward: each :class:`DKMParametrization` of the model with the
    parametrization list that holds its original (:attr:`members`), and the clustered weights
    computed so far."""

    def __init__(self, members: list[tuple[DKMParametrization, nn.Module]],
                 recompute: bool | None = None) -> None:
        self.members = members
        self._results: dict[int, Tensor] = {}
        # Decided outside the forward, where a weight FSDP2 shards is still a DTensor.
        self._recomputing = {
            id(p) for p, holder in members if p.can_recompute
            and (recompute if recompute is not None else is_sharded(holder.original))
        }
        self._rebuilds: dict[int, tuple[weakref.ref, Callable[[], Tensor]]] = {}

    def recomputes(self, p: DKMParametrization) -> bool:
        """Whether ``p``'s soft weights are rebuilt in the backward instead of kept (module
        docstring: the weights FSDP2 shards, or all with ``recompute=True``)."""
        return id(p) in self._recomputing

    def rebuilds(self, out: Tensor, rebuild: Callable[[], Tensor]) -> None:
        """Where autograd saves ``out`` or a view of it during this pass (``F.linear`` saves
        ``weight.t()``), keep ``rebuild`` in its place: it computes the tensor that ``out`` is
        a view of (its ``_base``, contiguous), from which the view is taken again."""
        base = out if out._base is None else out._base
        self._rebuilds[id(base)] = (weakref.ref(base), rebuild)

    def pack(self, tensor: Tensor) -> Any:
        """The saved-tensor hook: a view of a soft weight this pass can rebuild is kept as how
        to rebuild it; everything else as itself."""
        base = tensor if tensor._base is None else tensor._base
        entry = self._rebuilds.get(id(base))
        if entry is None or entry[0]() is not base:
            return tensor
        return _Rebuild(entry[1], tensor.size(), tensor.stride(), tensor.storage_offset())

    def batches(self, p: DKMParametrization, weight: Tensor) -> bool:
        """Whether ``p``'s soft ``"unique"`` step runs in the pass's batch (module docstring)."""
        if not (p.mode == "soft" and p.training and p.is_initialized
                and p.step_implementation == "unique") or is_sharded(weight):
            return False  # a sharded original: FSDP2 gathers it in its own module's forward
        if weight.device.type != "cpu":
            return True
        P, n, _ = p.layout.palette_shape
        return P * min(n, 1 << 16) * p.layout.spec.num_centroids <= CPU_BATCH_MAX_ENTRIES

    def clustered(self, requester: DKMParametrization, weight: Tensor) -> Tensor:
        """The soft clustered weight of ``requester`` (its original is ``weight``, and
        :meth:`batches` holds for it): on the first request, the batched step of every member
        that :meth:`batches` with the same settings."""
        result = self._results.get(id(requester))
        if result is not None:
            return result
        group = [(p, weight if p is requester else holder.original)
                 for p, holder in self.members if self.batches(p, holder.original)
                 and _settings(p, holder.original) == _settings(requester, weight)]
        outputs = unique_dkm_batch(
            [p.step_input(w) for p, w in group], [p.centroids for p, _ in group],
            [p.temperature for p, _ in group], max_iter=requester.max_iter,
            epsilon=requester.epsilon, gradient=requester.gradient,
            recompute=[self.recomputes(p) for p, _ in group],
        )
        for (p, w), out in zip(group, outputs, strict=True):
            self._results[id(p)] = p.step_output(out, w)
        return self._results[id(requester)]



class _Rebuild:
    """What autograd keeps, in place of (a view of) a soft weight, until the backward."""

    __slots__ = ("offset", "rebuild", "size", "stride")

    def __init__(self, rebuild: Callable[[], Tensor], size, stride, offset: int) -> None:
        self.rebuild, self.size, self.stride, self.offset = rebuild, size, stride, offset

    def __call__(self) -> Tensor:
        return self.rebuild().as_strided(self.size, self.stride, self.offset)


def _unpack(saved: Any) -> Tensor:
    return saved() if isinstance(saved, _Rebuild) else saved


def _settings(p: DKMParametrization, weight: Tensor) -> tuple:
    return p.max_iter, p.epsilon, p.gradient, weight.device, weight.dtype


@contextlib.contextmanager
def clustering_pass(model: nn.Module, recompute: bool | None = None
                    ) -> Iterator[ClusteringPass]:
    """Run one forward of ``model`` as one clustering pass (module docstring). Nested or
    repeated use is fine; on exit nothing of the pass is kept.

    ``recompute``: rebuild the soft weights of the ``"unique"`` step in the backward instead
    of keeping them and their float16 codes from the forward (module docstring). ``None``
    (default): for the weights that FSDP2 shards; ``True`` / ``False``: for all / none."""
    members = []
    for module in model.modules():
        holders = getattr(module, "parametrizations", None)
        if not isinstance(holders, nn.ModuleDict):
            continue
        for holder in holders.values():
            first = holder[0]
            if isinstance(first, DKMParametrization) and first.clustering_pass is None:
                members.append((first, holder))
    current = ClusteringPass(members, recompute)
    for p, _ in members:
        p.clustering_pass = current
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(parametrize.cached())
            if current._recomputing:
                stack.enter_context(saved_tensors_hooks(current.pack, _unpack))
            yield current
    finally:
        for p, _ in members:
            p.clustering_pass = None
