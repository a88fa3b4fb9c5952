"""The snapped (eval-mode) weights computed once per evaluation loop, not once per batch.

In ``eval()`` a :class:`~.parametrization.DKMParametrization` snaps its weight to the nearest
centroid (:func:`~.numerics.hard_assign`) on every forward. Inside a validation, test or predict
loop neither the weights nor the centroids change, yet each batch would pay a full
nearest-centroid pass over every clustered weight (0.4 s per forward on MiniLM's encoder on two
CPU cores). A :class:`SnapCache`, open for the length of such a loop, keeps each
parametrization's snapped weight from its first forward and hands it to the later ones.

It serves a forward only where that is safe and gives the same tensor bit for bit:

* only an eval-mode snap (``training`` false; a training forward, soft or hard, never asks);
* only with grad mode off (``torch.no_grad`` / ``torch.inference_mode``, as Lightning runs these
  loops) and not while ``torch.compile`` traces: a grad-enabled forward needs its
  straight-through graph, and is computed as without the cache;
* only an entry built under the same inference-mode flag (an inference tensor is never handed to
  a forward outside inference mode, nor a plain one to a forward inside it);
* only while what the entry was computed from is unchanged: the weight tensor (the same object,
  storage, dtype and ``_version``), the centroids' and the per-channel scales' (same object,
  storage and ``_version``), each equal in value to a copy taken with the entry. An in-place
  update of any of them (an optimizer step, a loaded state dict) makes the entry stale, and the
  weight is snapped again; so does one that bumps no version (through ``.data``, as EMA helpers
  such as ``torch_ema`` swap their averages in and out; through NumPy), which only the values
  show. Comparing them costs a read of the weight, a small part of a nearest-centroid pass.
  Tensors without a version counter (inference tensors) are never cached.

Each forward is handed its own copy of the kept snap, as each uncached forward gets a tensor of
its own: a reader that changes the weight it was handed in place (``F.embedding`` with
``max_norm`` renormalises the rows it looks up in the weight itself) changes neither the kept
snap nor what a tied owner or a later batch reads.

Only weights in host memory are kept: a kept snap and the copy of its weight are two more copies
of the weight for the length of the loop, which on an accelerator (where memory is the scarce
part and the snap takes milliseconds) could run a validation out of memory that ran before; on a
CPU the snap is the slow part (the 0.4 s above) and host memory is the plentiful one.

Nothing is kept past :meth:`SnapCache.close` (``DKMCallback`` closes it when the loop ends, on an
exception and at teardown; a training step's in-place update of a weight would make its entry
stale by version anyway, and training forwards never read the cache).
``DKMCallback`` does not open one under FSDP2, where the weights are gathered per forward and a
whole snapped weight per tensor would hold the whole model on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .parametrization import DKMParametrization

__all__ = ["SnapCache", "snap_cache"]

#: What one source tensor of an entry is checked against: the object itself (kept, so that its
#: id cannot be reused), its storage, dtype and in-place version.
_Source = tuple[Tensor, int, torch.dtype, int]


class _Entry(NamedTuple):
    """One parametrization's snapped weight and what it was computed from."""

    sources: tuple[_Source, ...]
    values: tuple[Tensor, ...]  # a copy of each source's tensor as it was
    inference: bool
    value: Tensor


def _sources(parametrization: DKMParametrization, weight: Tensor) -> tuple[_Source, ...] | None:
    """The weight, centroids and scales as an entry records them, or ``None`` where one of them
    has no version counter (an inference tensor): its in-place changes could not be seen."""
    tensors = [weight, parametrization.centroids]
    if parametrization.scale is not None:
        tensors.append(parametrization.scale)
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t, t.data_ptr(), t.dtype, t._version) for t in tensors)


def _same(a: tuple[_Source, ...], b: tuple[_Source, ...]) -> bool:
    return len(a) == len(b) and all(
        x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b, strict=True))


def _unchanged(entry: _Entry) -> bool:
    """Whether each source still holds the values it had when ``entry`` was kept (a change
    through ``.data`` bumps no version)."""
    return all(torch.equal(source[0], value)
               for source, value in zip(entry.sources, entry.values, strict=True))


def servable() -> bool:
    """Whether a forward may read from or write to a cache at all: grad mode off and not while
    ``torch.compile`` traces."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class SnapCache:
    """The snapped weights of a set of parametrizations, between :meth:`open` and :meth:`close`
    (module docstring). While open, each parametrization's ``snap_cache`` is this object, and its
    eval-mode forward asks :meth:`get` before snapping and hands the result to :meth:`put`."""

    def __init__(self) -> None:
        self._members: list[DKMParametrization] = []
        self._entries: dict[int, _Entry] = {}

    def open(self, parametrizations: Iterable[DKMParametrization]) -> None:
        """Start serving ``parametrizations`` (closing what this cache served before)."""
        self.close()
        self._members = list(parametrizations)
        for p in self._members:
            p.snap_cache = self

    def close(self) -> None:
        """Drop every entry and detach from the parametrizations (a no-op when not open)."""
        for p in self._members:
            if p.snap_cache is self:
                p.snap_cache = None
        self._members = []
        self._entries.clear()

    def __len__(self) -> int:
        """The number of snapped weights held."""
        return len(self._entries)

    def get(self, parametrization: DKMParametrization, weight: Tensor) -> Tensor | None:
        """The snapped ``weight`` kept for ``parametrization``, or ``None`` where there is none
        this forward may be served (module docstring)."""
        entry = self._entries.get(id(parametrization))
        if entry is None or not servable() or entry.inference != torch.is_inference_mode_enabled():
            return None
        sources = _sources(parametrization, weight)
        if sources is None or not _same(entry.sources, sources) or not _unchanged(entry):
            return None
        return entry.value.clone()  # the forward's own: its reader may change it in place

    def put(self, parametrization: DKMParametrization, weight: Tensor, value: Tensor) -> None:
        """Keep ``value``, the snapped ``weight`` just computed, for the next forwards (only
        where it may be served later: grad mode off, versioned sources, host memory). A copy is
        kept: the forward returns ``value`` itself, which its reader may change in place."""
        if not servable() or value.device.type != "cpu":
            return
        sources = _sources(parametrization, weight)
        if sources is not None:
            self._entries[id(parametrization)] = _Entry(
                sources, tuple(source[0].clone() for source in sources),
                torch.is_inference_mode_enabled(), value.clone())


@contextlib.contextmanager
def snap_cache(parametrizations: Iterable[DKMParametrization]) -> Iterator[SnapCache]:
    """A :class:`SnapCache` open on ``parametrizations`` inside, closed on exit (also after an
    exception): e.g. around a hand-written evaluation loop under ``torch.inference_mode()``."""
    cache = SnapCache()
    cache.open(parametrizations)
    try:
        yield cache
    finally:
        cache.close()
