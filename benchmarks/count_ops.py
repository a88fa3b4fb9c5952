"""Operators one training step dispatches, plain and with DKM, counted on the CPU as an
accelerator would run the step.

    python benchmarks/count_ops.py                        # cnn, resnet18, minilm at 4 bits
    python benchmarks/count_ops.py --models resnet18 --top 20 --json out.json

On a GPU every dispatched operator is (nearly always) a kernel launched from Python, so where
the weights are small next to the number of operators, the step costs what its launches cost.
This machine has no GPU, so the script counts the operators with a ``TorchDispatchMode`` on
the CPU, in the form the step takes on an accelerator: inside
:func:`lightning_dkm.engine.numerics.sync_free` (no host reads, the ``"unique"`` step on the
full code table), with every ``"unique"`` weight in the pass's one batch (the rule
:class:`~lightning_dkm.engine.clustering_pass.ClusteringPass` applies off the CPU; on the CPU
it batches by size), the O(n) passes in the accelerator's piece sizes
(:func:`lightning_dkm.engine.float16_codes.pass_sizes`) and without the CPU's native loops.
Views are not counted (no kernel). ``--top N`` lists the lines of
``lightning_dkm`` that dispatch the most operators in the DKM step.

The workloads, optimizer and DKM settings are ``perf_step.py``'s (``benchmarks/models.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ["LIGHTNING_DKM_NATIVE"] = "0"  # the CPU's C loops: an accelerator has none
sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_step

import lightning_dkm
from lightning_dkm.engine import clustering_pass, float16_codes
from lightning_dkm.engine.numerics import sync_free

#: Operators that only make a view (no kernel on any device).
VIEWS = frozenset({
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice",
    "squeeze", "t", "transpose", "unsqueeze", "view", "_unsafe_view",
})


class OperatorCount(TorchDispatchMode):
    """Counts the non-view operators dispatched inside it, each under the innermost line of
    ``lightning_dkm`` on the Python stack (or ``"(model, loss, optimizer)"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_line: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ not in VIEWS:
            self.total += 1
            ours = [f for f in traceback.extract_stack() if "lightning_dkm" in f.filename]
            where = "(model, loss, optimizer)"
            if ours:
                frame = ours[-1]
                where = f"{frame.filename.split('lightning_dkm/')[-1]}:{frame.lineno} {frame.name}"
            self.by_line[where] += 1
        return func(*args, **(kwargs or {}))


def as_on_an_accelerator() -> None:
    """Every weight the pass can batch joins its batch, as :meth:`ClusteringPass._batches`
    decides off the CPU, and the O(n) passes take the sizes they take there."""
    clustering_pass.ClusteringPass._batches = (
        lambda self, p, weight: self._batchable(p, weight))
    accelerator = float16_codes.pass_sizes(torch.device("meta"))
    float16_codes.pass_sizes = lambda device: accelerator


def count_step(model_name: str, bits: int | None) -> tuple[OperatorCount, int]:
    """The operators of one training step of ``model_name`` (plain where ``bits`` is None),
    after two warm-up steps (the first forward seeds the centroids), and the number of
    clustered tensors."""
    model = perf_step.build(model_name, "cpu")
    if bits is not None:
        perf_step.add_dkm(model, bits, "auto", max_iter=3)
    step = perf_step.make_step(model, model_name, "cpu")
    with sync_free():
        step()
        step()
        count = OperatorCount()
        with count:
            step()
    return count, len(lightning_dkm.clustered_tensors(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18", "minilm"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--top", type=int, default=0,
                        help="list the N lines of lightning_dkm that dispatch the most")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # min_size skips
    torch.set_num_threads(1)
    as_on_an_accelerator()
    rows = []
    for name in args.models:
        plain, _ = count_step(name, None)
        dkm, tensors = count_step(name, args.bits)
        added = dkm.total - plain.total
        rows.append({"model": name, "bits": args.bits, "clustered_tensors": tensors,
                     "plain": plain.total, "dkm": dkm.total, "added_per_tensor": added / tensors,
                     "top": dkm.by_line.most_common(args.top)})
        print(f"{name:9s} {args.bits} bits  {tensors:3d} clustered tensors  plain "
              f"{plain.total:6d}  dkm {dkm.total:6d}  added {added:6d} "
              f"({added / tensors:.0f} per tensor)")
        for where, n in dkm.by_line.most_common(args.top):
            print(f"    {n:6d}  {where}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
