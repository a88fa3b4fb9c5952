"""DKM once per optimizer step under gradient accumulation.

Inside an accumulation window (the micro-batches of one optimizer step) the weights do not
change, so the soft weights ``W = DKM(original)`` are the same for every micro-batch. A
:class:`SoftWindow` computes them once, on the window's first forward, and hands every
micro-batch but the last a detached leaf ``L`` of the same value: their backwards stop at ``L``
and add into ``L.grad``. The last micro-batch gets ``W`` through :class:`_WindowEnd`, whose
backward adds ``L.grad`` to that micro-batch's gradient, so DKM's backward (through the k-means
iterations into the original) runs once, with the window's summed gradient, *inside the last
micro-batch's backward*: the original's gradient appears in the same backward as every other
parameter's, which is what DDP's reducer (its hooks on the originals, with or without
``find_unused_parameters``) expects in the one backward it synchronises after ``no_sync``.

The result is the gradient of a DKM per micro-batch from the same start, up to float summation
order (``sum_b dL_b/dW`` backpropagated once instead of each ``dL_b/dW`` separately), and the
centroids move once per optimizer step, as with one batch of all the micro-batches' samples.

A window's soft weights are computed outside any ``saved_tensors_hooks``
(:func:`outside_saved_tensor_hooks`), so that an activation checkpoint around the first
micro-batch does not drop what DKM's backward reads; an activation checkpoint's replay of a
forward reads the window's tensors again, and one that ran its first forward without gradients
(a reentrant checkpoint) computes the soft weights again with DKM's graph from the window's
starting centroids, once.

Memory: the window keeps ``W`` (``n`` values per clustered tensor) and what DKM's backward reads
(the ``"unique"`` step's float16 codes, ``2 n`` bytes, and its per-code tables) from the first
forward to the last backward, and ``L.grad`` (``n`` values) in place of the original's gradient
until the last backward, where it is added in and freed before DKM's backward writes the
original's.

Nothing here imports Lightning; :class:`~lightning_dkm.lightning.forward_cache.ForwardCache`
opens and closes windows between the trainer's hooks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .parametrization import DKMParametrization

__all__ = ["AccumulationWindow", "SoftWindow", "outside_saved_tensor_hooks"]


@contextlib.contextmanager
def outside_saved_tensor_hooks() -> Iterator[None]:
    """Save tensors for the backward as if no ``saved_tensors_hooks`` were active (they are
    restored on exit). A window's soft weights are computed in its first micro-batch and
    backpropagated in its last: what DKM's backward reads must outlive the hooks of the
    micro-batch that computed them (a non-reentrant activation checkpoint would otherwise
    drop it, to compute it again in that micro-batch's backward only)."""
    hooks = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


class SoftWindow:
    """One parametrization's soft weights over an accumulation window (module docstring).

    ``soft`` is ``W`` with DKM's graph (``None`` until the window's first forward), ``leaf`` the
    detached leaf the micro-batches before the last one read, ``last`` whether the current
    micro-batch is the window's last one, ``spent`` whether DKM's backward has run.
    """

    __slots__ = ("graph", "last", "leaf", "soft", "spent")

    def __init__(self) -> None:
        self.soft: Tensor | None = None
        self.leaf: Tensor | None = None
        self.graph = False
        self.last = False
        self.spent = False

    def has(self) -> bool:
        """Whether the window holds soft weights usable now: computed, and computed with
        gradients recorded if they are recorded now (a forward under ``no_grad``, such as a
        reentrant activation checkpoint's first pass, computes them without DKM's graph)."""
        return self.soft is not None and not self.spent and (
            self.graph or not torch.is_grad_enabled())

    def keep(self, soft: Tensor) -> None:
        """The window's soft weights ``W`` (when computed again with a graph, the leaf stays,
        with the gradient it holds)."""
        self.soft, self.graph = soft, torch.is_grad_enabled()
        if self.leaf is None:
            self.leaf = soft.detach()
        if soft.requires_grad and not self.leaf.requires_grad:
            self.leaf.requires_grad_(True)

    def read(self) -> Tensor:
        """What a forward reads: the leaf, or in the last micro-batch ``W`` joined with the
        leaf's gradient (:class:`_WindowEnd`)."""
        assert self.soft is not None and self.leaf is not None
        if self.last and torch.is_grad_enabled() and self.soft.grad_fn is not None:
            return _WindowEnd.apply(self.soft, self)
        return self.leaf

    def take_grad(self) -> Tensor | None:
        """The leaf's accumulated gradient, handed over once (the leaf lets go of it)."""
        self.spent = True
        grad = None if self.leaf is None else self.leaf.grad
        if self.leaf is not None:
            self.leaf.grad = None
        return grad

    def pending(self) -> tuple[Tensor, Tensor] | None:
        """``(W, gradient)`` when micro-batches added into the leaf but DKM's backward has not
        run (no last micro-batch joined them: its forward or backward did not happen)."""
        if self.spent or self.soft is None or self.soft.grad_fn is None:
            return None
        grad = self.take_grad()
        return None if grad is None else (self.soft, grad)


class _WindowEnd(torch.autograd.Function):
    """``W`` unchanged in the forward; in the backward the gradient plus the leaf's."""

    @staticmethod
    def forward(ctx: Any, soft: Tensor, window: SoftWindow) -> Tensor:
        ctx.window = window
        return soft.view_as(soft)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        earlier = ctx.window.take_grad()
        return (grad if earlier is None else grad + earlier.to(grad.dtype)), None


class AccumulationWindow:
    """The soft windows of a model's parametrizations over one optimizer step: opened at the
    window's first micro-batch, told before each micro-batch whether it is the last
    (:meth:`set_last`), closed after the optimizer step (:meth:`close`)."""

    def __init__(self, parametrizations: Iterable[DKMParametrization]) -> None:
        self.members = list(parametrizations)
        for p in self.members:
            p.window = SoftWindow()

    def set_last(self, last: bool) -> None:
        for p in self.members:
            if p.window is not None:
                p.window.last = last

    def finish(self) -> None:
        """Run DKM's backward for gradient still held by the leaves (one call for every
        tensor): a window whose last micro-batch did not join them."""
        pending = [(p.layout.name, w) for p in self.members if p.window is not None
                   and (w := p.window.pending()) is not None]
        if not pending:
            return
        distributed = torch.distributed  # several ranks: DDP synchronised their gradients
        if (distributed.is_available() and distributed.is_initialized()
                and distributed.get_world_size() > 1):
            names = ", ".join(name for name, _ in pending)
            warnings.warn(
                f"DKM: the last micro-batch of this accumulation window did not read {names}; "
                "their DKM backward runs now, after the gradients were synchronised across "
                "ranks, so this optimizer step uses this rank's gradients of these weights "
                "only. Read every clustered weight in every micro-batch's forward, or train "
                "without accumulate_grad_batches.", RuntimeWarning, stacklevel=2)
        torch.autograd.backward([s for _, (s, _) in pending], [g for _, (_, g) in pending])

    def close(self, finish: bool = True) -> None:
        """End the window (after :meth:`finish` unless ``finish`` is false, as after an
        exception); the parametrizations compute per forward again until the next one."""
        try:
            if finish:
                self.finish()
        finally:
            for p in self.members:
                p.window = None
            self.members = []
