"""One clustering pass per training forward, held open between Lightning's hooks; one DKM
step per optimizer step under gradient accumulation.

The engine's :func:`~lightning_dkm.engine.clustering_pass.clustering_pass` is a context manager;
Lightning's callback hooks open and close things in separate calls. :class:`ForwardCache` holds
the pass open from the batch start to just before the backward (and closes it at the batch end
and on an exception), so nothing of the pass outlives the step. Inside it a weight read twice in
one forward is clustered once, and the ``"unique"`` step of every clustered weight runs as one
batched call.

Under gradient accumulation it also holds an
:class:`~lightning_dkm.engine.accumulation.AccumulationWindow` over the micro-batches of one
optimizer step: the soft weights are computed on the window's first forward, and DKM's backward
runs once, in the last micro-batch's backward (or, if that one did not join, in
:meth:`ForwardCache.finish_window` before the optimizer step).
"""

from __future__ import annotations

from contextlib import ExitStack

from torch import nn

from ..engine.accumulation import AccumulationWindow
from ..engine.clustering_pass import clustering_pass, pass_members
from ..engine.parametrization import DKMParametrization

__all__ = ["ForwardCache"]


class ForwardCache:
    """``clustering_pass(model)`` held open between :meth:`open` and :meth:`close`, and the
    accumulation window between :meth:`open` ``(last=...)`` and :meth:`end_window`."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self._members: list[tuple[DKMParametrization, nn.Module]] | None = None
        self._window: AccumulationWindow | None = None
        self._last = False

    def forget(self) -> None:
        """Look the model's parametrizations up again at the next :meth:`open` (they were
        registered or removed)."""
        self.end_window(finish=False)
        self._members = None

    def open(self, model: nn.Module, last: bool | None = None) -> None:
        """Open a pass for ``model``'s next forward (closing any pass still open). ``last``:
        ``None`` outside gradient accumulation (a DKM step per forward); else this forward
        belongs to an accumulation window (opened now if none is), and is its last one or not."""
        self.close()
        if self._members is None:
            self._members = pass_members(model)
        if last is None:
            self.end_window()
        else:
            if self._window is None:
                self._window = AccumulationWindow(p for p, _ in self._members)
            self._window.set_last(last)
            self._last = last
        self._stack = ExitStack()
        self._stack.enter_context(clustering_pass(model, members=self._members))

    def close(self) -> None:
        """Leave the pass (a no-op when none is open)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def window_is_last(self) -> bool:
        """Whether an accumulation window is open and at its last micro-batch."""
        return self._window is not None and self._last

    def finish_window(self) -> None:
        """The gradients of the window's micro-batches complete: DKM's backward for what no
        last micro-batch joined (normally nothing: it ran in the last backward)."""
        if self._window is not None:
            self._window.finish()

    def end_window(self, finish: bool = True) -> None:
        """Close the accumulation window (after :meth:`finish_window` unless ``finish`` is
        false, as after an exception)."""
        window, self._window = self._window, None
        if window is not None:
            window.close(finish)
