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
(:func:`lightning_dkm.engine.float16_codes.pass_sizes`; a checkout from before that function
runs with its own sizes) and without the CPU's native loops. Views and bare allocations are
not counted (no kernel). ``--top N`` lists the lines of
``lightning_dkm`` that dispatch the most operators in the DKM step.

The workloads, optimizer and DKM settings are ``perf_step.py``'s (``benchmarks/models.py``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_step

import lightning_dkm
from lightning_dkm.engine import clustering_pass, float16_codes, native
from lightning_dkm.engine.numerics import sync_free

#: Operators that only make a view or allocate (no kernel on any device).
NO_KERNEL = frozenset({
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice",
    "squeeze", "t", "transpose", "unsqueeze", "view", "_unsafe_view",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
})
#: The package's folder: a stack frame in it is one of ours.
PACKAGE = Path(lightning_dkm.__file__).resolve().parent


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched inside it that launch a kernel (not in
    :data:`NO_KERNEL`), each under the innermost line of ``lightning_dkm`` on the Python stack
    (or ``"(model, loss, optimizer)"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_line: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ not in NO_KERNEL:
            self.total += 1
            ours = [f for f in traceback.extract_stack()
                    if Path(f.filename).resolve().is_relative_to(PACKAGE)]
            where = "(model, loss, optimizer)"
            if ours:
                frame = ours[-1]
                file = Path(frame.filename).resolve().relative_to(PACKAGE)
                where = f"{file}:{frame.lineno} {frame.name}"
            self.by_line[where] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def as_on_an_accelerator() -> Iterator[None]:
    """Inside: every weight the pass can batch joins its batch, as
    :meth:`ClusteringPass._batches` decides off the CPU; the O(n) passes take the sizes they
    take there; no native loops; no host reads (:func:`sync_free`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(native.turned_off())
        stack.enter_context(mock.patch.object(
            clustering_pass.ClusteringPass, "_batches",
            lambda self, p, weight: self._batchable(p, weight)))
        if hasattr(float16_codes, "pass_sizes"):
            accelerator = float16_codes.pass_sizes(torch.device("meta"))
            stack.enter_context(mock.patch.object(float16_codes, "pass_sizes",
                                                  lambda device: accelerator))
        stack.enter_context(sync_free())
        yield


def count_step(model_name: str, bits: int | None) -> tuple[OperatorCount, int]:
    """The operators of one training step of ``model_name`` (plain where ``bits`` is None),
    after two warm-up steps (the first forward seeds the centroids), and the number of
    clustered tensors."""
    model = perf_step.build(model_name, "cpu")
    if bits is not None:
        perf_step.add_dkm(model, bits, "auto", max_iter=3)
    step = perf_step.make_step(model, model_name, "cpu")
    with as_on_an_accelerator():
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
