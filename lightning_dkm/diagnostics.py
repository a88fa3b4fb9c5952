"""Debugging aids for a training step's cost on an accelerator, usable without one.

:func:`count_host_syncs` counts the calls in a block that read tensor data back to the host;
:func:`graph_breaks` runs ``torch._dynamo.explain`` on one call. The package's own tests use
both to hold the DKM step to "no host read, no graph break" (``tests/test_host_syncs.py``), and
``benchmarks/graph_breaks.py`` prints them per implementation; a user can check their own step
the same way::

    from lightning_dkm.diagnostics import count_host_syncs

    with count_host_syncs() as log:
        loss = model(x).sum()
        loss.backward()
    print(log.count, log.calls)   # every read with the line of lightning_dkm (or yours) it is on

**Why reads matter.** On CUDA a read (``bool(t)``, ``t.item()``, ``nonzero``, ...) stalls the
CPU until the GPU has finished all the work queued before it, so the CPU can no longer queue
ahead. On CPU the same calls are free, so this counts them (a CPU-side proxy: every Python entry
point below, wrapped while the block runs) rather than timing them. Where CUDA exists,
``torch.cuda.set_sync_debug_mode("error")`` is the real check. The wrappers patch ``torch``
globally while the block runs: use it in a debugging session or a test, not in a running job
with other threads.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["SyncLog", "count_host_syncs", "graph_breaks"]

# Methods of torch.Tensor that read data back to the host (on an accelerator: a sync).
_READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__",
                 "__index__", "nonzero", "argwhere", "unique", "bincount", "masked_select")
# Functions whose output size or error check depends on the data (a sync on CUDA): nonzero's
# and unique's shapes, bincount's max, linalg.solve's singularity check.
_READ_FUNCTIONS = (("torch", "nonzero"), ("torch", "argwhere"), ("torch", "unique"),
                   ("torch", "bincount"), ("torch", "masked_select"),
                   ("torch", "repeat_interleave"), ("torch.linalg", "solve"),
                   ("torch.linalg", "inv"), ("torch.linalg", "cholesky"))
_MISSING = object()


class SyncLog:
    """What :func:`count_host_syncs` saw: one entry per read, ``"name at file:line"`` of the
    innermost frame in ``lightning_dkm`` (or the caller's frame)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        return f"SyncLog({self.count}: {self.calls})"


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    ours = [f for f in frames if "lightning_dkm" in f.filename]
    frame = (ours or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _has_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncLog]:
    """Count, while the block runs, every call that reads tensor data back to the host:
    ``item``/``tolist``/``numpy``/``cpu``, ``bool``/``float``/``int``/``index`` of a tensor,
    ``nonzero``/``argwhere``/``unique``/``bincount``/``masked_select``/``repeat_interleave``,
    boolean-mask indexing, and ``linalg.solve``/``inv``/``cholesky`` (their error checks).
    Only the outermost of nested calls counts (``Tensor.unique`` calls ``torch.unique``).
    Everything patched is restored when the block ends, also on an exception."""
    log = SyncLog()
    state = threading.local()
    patched: list[tuple[object, str, object]] = []

    def wrap(name: str, original: Callable, only_if: Callable | None = None) -> Callable:
        def counted(*args, **kwargs):
            if getattr(state, "inside", False) or (only_if is not None and not only_if(args)):
                return original(*args, **kwargs)
            state.inside = True
            try:
                log.calls.append(f"{name} at {_where()}")
                return original(*args, **kwargs)
            finally:
                state.inside = False
        return counted

    def patch(owner: object, name: str, replacement: Callable) -> None:
        patched.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, replacement)

    try:
        for name in _READ_METHODS:
            patch(torch.Tensor, name, wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
        for module_name, name in _READ_FUNCTIONS:
            module = sys.modules[module_name]
            patch(module, name, wrap(f"{module_name}.{name}", getattr(module, name)))
        patch(torch.Tensor, "__getitem__", wrap("mask indexing", torch.Tensor.__getitem__,
                                                lambda args: _has_mask(args[1])))
        patch(torch.Tensor, "__setitem__", wrap("mask assignment", torch.Tensor.__setitem__,
                                                lambda args: _has_mask(args[1])))
        yield log
    finally:
        for owner, name, original in reversed(patched):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def graph_breaks(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``torch._dynamo.explain`` of one call ``fn(*args, **kwargs)``, after
    ``torch._dynamo.reset()``: ``{"graphs": int, "breaks": int, "reasons": [str]}``, each
    reason's first line (160 characters at most) with the file and line of the user frame
    where the graph broke."""
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
        reasons.append(f"{reason.reason.splitlines()[0][:160]}{where}")
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count,
            "reasons": reasons}
