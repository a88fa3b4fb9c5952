"""Host syncs and ``torch.compile`` graph breaks of one DKM training step, per implementation.

    python benchmarks/graph_breaks.py                  # both tables (about a minute on CPU)
    python benchmarks/graph_breaks.py --json out.json  # the numbers docs/benchmarks.md shows

**Host syncs.** A CUDA step that reads a value back to the host (``bool(t)``, ``t.item()``,
``nonzero``, ...) stalls the CPU until the GPU has finished all the work queued before it, so
the CPU can no longer queue ahead. This machine has no GPU, so
:func:`lightning_dkm.diagnostics.count_host_syncs` counts the calls that force such a read on
an accelerator (a CPU-side proxy: every Python entry point it lists, wrapped for the duration
of the block), during one training forward and backward of a ``DKMParametrization`` (soft
mode) on a ``Linear(256, 256)`` weight, 4 bits. The steps run in their sync-free form
(:func:`lightning_dkm.engine.numerics.sync_free`), the form they take on an accelerator and
under ``torch.compile``; ``--eager-cpu`` counts the CPU default too, whose reads are free there
(no device) and let the loop stop early.
``torch.cuda.set_sync_debug_mode("error")`` is the real check where CUDA exists
(``tests/test_host_syncs.py``).

**Graph breaks.** ``torch._dynamo.explain`` on the same forward (training mode, soft), through
:func:`lightning_dkm.diagnostics.graph_breaks`: the number of graphs and breaks, and each
break's reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from lightning_dkm.diagnostics import SyncLog, count_host_syncs, graph_breaks

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


def graph_breaks_of_step(implementation: str, epsilon: float) -> dict:
    """:func:`lightning_dkm.diagnostics.graph_breaks` of the soft training forward."""
    weight, p = parametrized_weight(implementation, epsilon)
    return graph_breaks(p, weight)


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
                row.update(graph_breaks_of_step(implementation, epsilon))
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
