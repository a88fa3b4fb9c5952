"""Host syncs and ``torch.compile`` graph breaks of one DKM training step, per implementation.

    python benchmarks/graph_breaks.py                  # both tables (about a minute on CPU)
    python benchmarks/graph_breaks.py --json out.json  # the numbers docs/benchmarks.md shows

**Host syncs.** A CUDA step that reads a value back to the host (``bool(t)``, ``t.item()``,
``nonzero``, ...) stalls the CPU until the GPU has finished all the work queued before it, so
the CPU can no longer queue ahead. This machine has no GPU, so :func:`count_host_syncs`
counts the calls that force such a read on an accelerator (a CPU-side proxy: every Python
entry point below, wrapped for the duration of the block), during one training forward and
backward of a ``DKMParametrization`` (soft mode) on a ``Linear(256, 256)`` weight, 4 bits.
The steps run in their sync-free form (:func:`lightning_dkm.engine.numerics.sync_free`), the form
they take
on an accelerator and under ``torch.compile``; ``--eager-cpu`` counts the CPU default too,
whose reads are free there (no device) and let the loop stop early.
``torch.cuda.set_sync_debug_mode("error")`` is the real check where CUDA exists
(``tests/test_host_syncs.py``).

**Graph breaks.** ``torch._dynamo.explain`` on the same forward (training mode, soft): the
number of graphs and breaks, and each break's reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

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
    frames = traceback.extract_stack()[:-2]  # without _where and the wrapper
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
    Only the outermost of nested calls counts (``Tensor.unique`` calls ``torch.unique``)."""
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

    for name in _READ_METHODS:
        patch(torch.Tensor, name, wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for module_name, name in _READ_FUNCTIONS:
        module = sys.modules[module_name]
        patch(module, name, wrap(f"{module_name}.{name}", getattr(module, name)))
    patch(torch.Tensor, "__getitem__", wrap("mask indexing", torch.Tensor.__getitem__,
                                            lambda args: _has_mask(args[1])))
    patch(torch.Tensor, "__setitem__", wrap("mask assignment", torch.Tensor.__setitem__,
                                            lambda args: _has_mask(args[1])))
    try:
        yield log
    finally:
        for owner, name, original in reversed(patched):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


IMPLEMENTATIONS = ("reference", "chunked", "unique", "auto")


def parametrized_weight(implementation: str, epsilon: float, bits: int = 4,
                        shape: tuple[int, int] = (256, 256), cluster_dim: int = 1):
    """A trainable weight and an initialised ``DKMParametrization`` (soft, training) for it."""
    from lightning_dkm import ClusterSpec, PaletteLayout
    from lightning_dkm.engine.parametrization import DKMParametrization

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape) * 0.05)
    layout = PaletteLayout(shape, ClusterSpec(bits=bits, cluster_dim=cluster_dim), name="fc")
    p = DKMParametrization(layout, implementation=implementation, epsilon=epsilon)
    p.initialize(weight)
    p.train()
    return weight, p


def _sync_free() -> contextlib.AbstractContextManager:
    from lightning_dkm.engine import numerics

    return numerics.sync_free()


def syncs_of_one_step(implementation: str, epsilon: float, eager_cpu: bool = False) -> SyncLog:
    """The host reads of one training forward + backward (after one warm-up step)."""
    weight, p = parametrized_weight(implementation, epsilon)
    upstream = torch.randn(weight.shape)
    mode = contextlib.nullcontext() if eager_cpu else _sync_free()
    with mode:
        (p(weight) * upstream).sum().backward()
        with count_host_syncs() as log:
            (p(weight) * upstream).sum().backward()
    return log


def graph_breaks(implementation: str, epsilon: float) -> dict:
    """``torch._dynamo.explain`` of the soft training forward."""
    import torch._dynamo

    weight, p = parametrized_weight(implementation, epsilon)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(p)(weight)
    reasons = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
        reasons.append(f"{reason.reason.splitlines()[0][:160]}{where}")
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count,
            "reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--eager-cpu", action="store_true",
                        help="also count the eager CPU default (reads that are free on CPU)")
    parser.add_argument("--no-graph-breaks", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    print(f"torch {torch.__version__}; Linear(256, 256) weight, 4 bits, soft training step")
    rows = []
    for implementation in args.implementations:
        for epsilon in (1e-4, 0.0):
            row: dict = {"implementation": implementation, "epsilon": epsilon}
            log = syncs_of_one_step(implementation, epsilon)
            row["syncs"], row["sync_calls"] = log.count, log.calls
            if args.eager_cpu:
                row["eager_cpu_reads"] = syncs_of_one_step(implementation, epsilon, True).count
            if not args.no_graph_breaks:
                row.update(graph_breaks(implementation, epsilon))
            rows.append(row)
            text = f"{implementation:9s} epsilon {epsilon:g}: host syncs {row['syncs']}"
            if args.eager_cpu:
                text += f" (eager CPU reads {row['eager_cpu_reads']})"
            if "graphs" in row:
                text += f", graphs {row['graphs']}, graph breaks {row['breaks']}"
            print(text)
            for call in row["sync_calls"]:
                print(f"    sync: {call}")
            for reason in row.get("reasons", []):
                print(f"    break: {reason}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
