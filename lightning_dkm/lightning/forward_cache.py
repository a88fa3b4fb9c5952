"""One clustering pass per training forward, held open between Lightning's hooks.

The engine's :func:`~lightning_dkm.engine.clustering_pass.clustering_pass` is a context manager;
Lightning's callback hooks open and close things in separate calls. :class:`ForwardCache` holds
the pass open from the batch start to just before the backward (and closes it at the batch end
and on an exception), so nothing of it outlives the step: gradient accumulation and manual
optimisation included. Inside it a weight read twice in one forward is clustered once, and the
``"unique"`` step of every clustered weight runs as one batched call.
"""

from __future__ import annotations

from contextlib import ExitStack

from torch import nn

from ..engine.clustering_pass import clustering_pass

__all__ = ["ForwardCache"]


class ForwardCache:
    """``clustering_pass(model)`` held open between :meth:`open` and :meth:`close`."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None

    def open(self, model: nn.Module) -> None:
        """Open a pass for ``model``'s next forward (closing any pass still open)."""
        self.close()
        self._stack = ExitStack()
        self._stack.enter_context(clustering_pass(model))

    def close(self) -> None:
        """Leave the pass (a no-op when none is open)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
