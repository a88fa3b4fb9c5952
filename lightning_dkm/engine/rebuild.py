"""Rebuild instead of keep (FSDP2): a ``"unique"`` weight's soft weights computed again in the
backward from the step's input, instead of kept from the forward.

Between the forward and the backward a ``"unique"`` weight normally costs ``6 n`` bytes beyond
the model: its soft weights (``n`` floats, which ``F.linear`` saves for the input's gradient)
and its float16 codes (which the DKM backward reads). Under FSDP2 that is the whole model's size
on every rank, whatever the world size, while FSDP2 itself keeps only shards (it frees each
gathered weight after its unit's forward and gathers it again for the backward). With
``rebuild`` the step keeps neither: it saves its input, the gathered weight, which FSDP2 gathers
again for the backward anyway, and computes the codes again from it there
(:class:`CodesOnce`); its output's :attr:`~.numerics.DKMOutput.rebuild` computes the soft
weights again (the codes and one look-up in the step's per-code output table, bit for bit),
and :class:`SavedSoftWeights`, a saved-tensor hook, keeps that in place of every saved view of
them. What stays per weight is the table and the step's trajectory on the distinct values
(``O(U k max_iter)``, ``U <= 65,536``); the price is one more pass over the weight for the codes
and one look-up in the backward. :func:`~.clustering_pass.clustering_pass` decides which
weights rebuild (those FSDP2 shards, by default).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from .float16_codes import CodeColumns, float16_codes
from .numerics import DKMOutput, Normalization

__all__ = ["CodesOnce", "SavedSoftWeights", "rebuilt_soft_weights"]


class CodesOnce:
    """A rebuilding tensor's codes between the rebuild of its soft weights (``F.linear``'s
    backward, first) and the DKM backward (next), computed once for both."""

    __slots__ = ("codes",)

    def __init__(self) -> None:
        self.codes: Tensor | None = None

    def take_codes(self, x: Tensor, normalization: Normalization | None,
                   device_side: bool) -> Tensor:
        codes, self.codes = self.codes, None
        if codes is None:
            codes = float16_codes(x.detach(), normalization, device_side)[0]
        return codes


@torch.no_grad()
def rebuilt_soft_weights(x: Tensor, normalization: Normalization | None, device_side: bool,
                         table: Tensor, dtype: torch.dtype, codes: CodesOnce) -> Tensor:
    """The soft weights of one tensor again, from its input and its per-code output table: the
    forward's codes and look-up, bit for bit. The codes stay for the DKM backward."""
    codes.codes = float16_codes(x, normalization, device_side)[0]
    return CodeColumns(codes.codes, device_side).look_up(table).unsqueeze(-1).to(dtype)


class _Saved:
    """What autograd keeps, in place of (a view of) a soft weight, until the backward."""

    __slots__ = ("offset", "rebuild", "size", "stride")

    def __init__(self, rebuild: Callable[[], Tensor], size, stride, offset: int) -> None:
        self.rebuild, self.size, self.stride, self.offset = rebuild, size, stride, offset

    def __call__(self) -> Tensor:
        return self.rebuild().as_strided(self.size, self.stride, self.offset)


class SavedSoftWeights:
    """The soft weights of rebuilding steps (:meth:`keep`), and the saved-tensor hook
    (:meth:`hooks`) that keeps how to rebuild them in place of every saved view of them."""

    def __init__(self) -> None:
        self._rebuilds: dict[int, tuple[weakref.ref, Callable[[], Tensor]]] = {}

    def keep(self, result: DKMOutput) -> None:
        """Where autograd saves ``result.weights`` or a view of it (``F.linear`` saves
        ``weight.t()``), keep ``result.rebuild`` (if any) in its place: it computes the tensor
        that they are views of (their ``_base``, contiguous)."""
        if result.rebuild is not None:
            out = result.weights
            base = out if out._base is None else out._base
            self._rebuilds[id(base)] = (weakref.ref(base), result.rebuild)

    def _pack(self, tensor: Tensor) -> Any:
        base = tensor if tensor._base is None else tensor._base
        entry = self._rebuilds.get(id(base))
        if entry is None or entry[0]() is not base:
            return tensor
        return _Saved(entry[1], tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def _unpack(saved: Any) -> Tensor:
        return saved() if isinstance(saved, _Saved) else saved

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with saved_tensors_hooks(self._pack, self._unpack):
            yield
