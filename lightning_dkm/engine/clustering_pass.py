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
mode, or in ``eval()`` are computed per tensor as outside a pass.

Tensors are batched together only when their step settings agree (``max_iter``, ``epsilon``,
``gradient``, device); each group is one call, in which every tensor still stops early on its
own, so every result equals the tensor's own call (up to float summation order). Every
clustered weight of the model is clustered on the first read, also one that this forward
does not read: for a model that uses only part of its weights per step (alternating
sub-models), open the pass on the part that runs. Close the pass before the backward
(``DKMCallback`` does): what it holds is the forward's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distinct import unique_dkm_batch
from .parametrization import DKMParametrization

__all__ = ["ClusteringPass", "clustering_pass"]


class ClusteringPass:
    """The weights of one forward: each :class:`DKMParametrization` of the model with the
    parametrization list that holds its original (:attr:`members`), and the clustered weights
    computed so far."""

    def __init__(self, members: list[tuple[DKMParametrization, nn.Module]]) -> None:
        self.members = members
        self._results: dict[int, Tensor] = {}

    def clustered(self, requester: DKMParametrization, weight: Tensor) -> Tensor:
        """The soft clustered weight of ``requester`` (its original is ``weight``): on the first
        request, the batched step of every member that runs the ``"unique"`` step in soft
        training mode with the same settings."""
        result = self._results.get(id(requester))
        if result is not None:
            return result
        group = [(p, weight if p is requester else holder.original)
                 for p, holder in self.members if self._batchable(p)
                 and _settings(p, holder.original) == _settings(requester, weight)]
        outputs = unique_dkm_batch(
            [p.step_input(w) for p, w in group], [p.centroids for p, _ in group],
            [p.temperature for p, _ in group], max_iter=requester.max_iter,
            epsilon=requester.epsilon, gradient=requester.gradient,
        )
        for (p, w), out in zip(group, outputs, strict=True):
            self._results[id(p)] = p.step_output(out, w)
        return self._results[id(requester)]

    @staticmethod
    def _batchable(p: DKMParametrization) -> bool:
        return (p.mode == "soft" and p.training and p.is_initialized
                and p.step_implementation == "unique")


def _settings(p: DKMParametrization, weight: Tensor) -> tuple:
    return p.max_iter, p.epsilon, p.gradient, weight.device, weight.dtype


@contextlib.contextmanager
def clustering_pass(model: nn.Module) -> Iterator[ClusteringPass]:
    """Run one forward of ``model`` as one clustering pass (module docstring). Nested or
    repeated use is fine; on exit nothing of the pass is kept."""
    members = []
    for module in model.modules():
        holders = getattr(module, "parametrizations", None)
        if not isinstance(holders, nn.ModuleDict):
            continue
        for holder in holders.values():
            first = holder[0]
            if isinstance(first, DKMParametrization) and first.clustering_pass is None:
                members.append((first, holder))
    current = ClusteringPass(members)
    for p, _ in members:
        p.clustering_pass = current
    try:
        with parametrize.cached():
            yield current
    finally:
        for p, _ in members:
            p.clustering_pass = None
