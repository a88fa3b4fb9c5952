"""The O(n) passes of the default ``"unique"`` DKM step on one tensor, each timed alone.

    python benchmarks/perf_passes.py                    # n = 524,288 (the CNN's fc1 size)
    python benchmarks/perf_passes.py --n 589824 --alternatives --compile

The ``"unique"`` step (``lightning_dkm.engine.distinct``) touches every weight in a few passes:
the float16 codes (centre, power-of-two scale, round), counting them (``bincount`` over the
65,536 codes), the forward's look-up of each weight's soft value, and in the backward the
per-code sums of the incoming gradient (a weighted ``bincount``) and the look-up of each
weight's gradient ``s_u + b_u g_i``. This script times each as the step calls it (median
process CPU time over ``--repeats`` calls, so that other load on the machine counts little;
one thread by default) and counts the page faults per call: a pass that writes a fresh tensor
of ``n`` floats pays for first touching its pages, which on this machine costs as much as the
pass itself. ``--alternatives`` times the other ways of doing the same work that were
evaluated for #22 (``torch.unique``, ``index_add_``, ``scatter_add_``, one gather of packed
``(s, b)`` pairs); ``--compile`` times ``torch.compile`` of the backward's look-up, compile time
included.

The rows time the passes as PyTorch ops (``lightning_dkm.engine.native`` off), then, where the
native loops build here, the same work as the step does it with them: encoding and counting in
one read of the weights, each look-up and the per-code sums one loop. The loops are built
first in an empty cache directory, so the build time printed is what a machine pays once.

    python benchmarks/perf_passes.py --clock cpu   # (CPU time is what it always measures)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clocks

from lightning_dkm.engine import native
from lightning_dkm.engine.float16_codes import CodeColumns, code_constants, encode

_CODES = 1 << 16


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median CPU milliseconds per call and page faults per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return 1e3 * statistics.median(times), faults / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1 << 19, help="weights in the tensor")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alternatives", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.n < 1 or args.repeats < 1 or args.threads < 1:
        parser.error(f"--n, --repeats and --threads must be >= 1; got {args.n}, "
                     f"{args.repeats}, {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.n
    x = torch.randn(1, n) * 0.05
    g = torch.randn(1, n)
    center, unit, _ = code_constants(x, None)
    codes = encode(x, center, unit, fused=False)
    columns = CodeColumns(codes, fused=False).chunks().__next__()[1] if n <= (1 << 20) else None
    table_s, table_b = torch.randn(_CODES), torch.randn(_CODES)

    def unfused() -> CodeColumns:
        return CodeColumns(codes, fused=False)

    print(f"n {n}, threads {args.threads}, CPU ms per call (median of {args.repeats}), "
          f"page faults per call")
    print("PyTorch ops:")
    rows: list[tuple[str, Callable[[], object]]] = [
        ("codes (centre and scale given, round to float16)",
         lambda: encode(x, center, unit, fused=False)),
        ("codes -> table columns (int32)", lambda: unfused().chunks().__next__()),
        ("count per code (bincount)", lambda: unfused().sum_per_code()),
        ("forward look-up (columns + gather)", lambda: unfused().look_up(table_s)),
        ("backward per-code sums (weighted bincount)", lambda: unfused().sum_per_code(g)),
        ("backward look-up s_u + b_u g_i (columns + 2 gathers)",
         lambda: unfused().look_up(table_s, (table_b, g))),
    ]
    if args.alternatives and columns is not None:
        flat_g = g.view(-1)
        long_columns = columns.long()
        pairs = torch.stack((table_s, table_b), 1).contiguous().view(torch.float64).view(-1)

        def pair_gather() -> torch.Tensor:
            p = pairs.index_select(0, columns).view(torch.float32).view(n, 2)
            return torch.addcmul(p[:, 0], p[:, 1], flat_g)

        rows += [
            ("  alt: count by torch.unique(return_inverse, return_counts)",
             lambda: torch.unique(columns, return_inverse=True, return_counts=True)),
            ("  alt: count by index_add_", lambda: torch.zeros(_CODES).index_add_(
                0, columns, torch.ones(()).expand(n))),
            ("  alt: per-code sums by index_add_",
             lambda: torch.zeros(_CODES).index_add_(0, columns, flat_g)),
            ("  alt: per-code sums by scatter_add_ (int64 columns given)",
             lambda: torch.zeros(_CODES).scatter_add_(0, long_columns, flat_g)),
            ("  alt: backward look-up, one gather of (s, b) pairs", pair_gather),
        ]
    total = conversion = 0.0
    for name, fn in rows:
        ms, faults = measure(fn, args.repeats)
        total += 0.0 if name.startswith("  alt") else ms
        conversion = ms if name.startswith("codes ->") else conversion
        print(f"{name:58s} {ms:8.3f} ms {faults:8.0f} faults")
    # the conversion's own row and the four rows after it each convert the codes to columns;
    # a step converts them twice (once in the forward, once in the backward)
    total -= 3 * conversion
    print(f"{'  a step: all of them, the columns converted twice':58s} {total:8.3f} ms")
    fused_rows(x, center, unit, codes, g, table_s, table_b, args.repeats, total)
    if args.compile and columns is not None:
        def look_up(cols: torch.Tensor, s: torch.Tensor, b: torch.Tensor,
                    grad: torch.Tensor) -> torch.Tensor:
            index = cols.long()
            return s[index] + b[index] * grad

        start = time.perf_counter()
        compiled = torch.compile(look_up, dynamic=False)
        compiled(columns, table_s, table_b, g.view(-1))
        seconds = time.perf_counter() - start
        ms, faults = measure(lambda: compiled(columns, table_s, table_b, g.view(-1)),
                             args.repeats)
        print(f"{'  torch.compile: backward look-up (first compile ' + f'{seconds:.1f} s)':58s}"
              f" {ms:8.3f} ms {faults:8.0f} faults")


def fused_rows(x, center, unit, codes, g, table_s, table_b, repeats: int,
               pytorch_total: float) -> None:
    """The same work with the native loops, built first in an empty cache directory."""
    build = clocks.native_build()
    print(clocks.describe_native(build) + ":")
    loops = native.loops_for()
    if loops is None:
        return
    inverse_unit = 1.0 / unit
    out = torch.empty_like(x)
    P = x.shape[0]
    counts = torch.empty(P * _CODES, dtype=torch.int32)
    marks = torch.empty(P * native.MARK_WORDS, dtype=torch.int64)
    total = 0.0
    for name, fn in [
        ("codes and count per code, one loop",
         lambda: loops.encode_mark(x, center, inverse_unit, counts, marks)),
        ("forward look-up", lambda: loops.look_up(codes, table_s, torch.empty_like(x))),
        ("backward per-code sums", lambda: loops.sum_per_code(codes, g)),
        ("backward look-up s_u + b_u g_i", lambda: loops.look_up_affine(
            codes, table_s, table_b, g, torch.empty_like(out))),
    ]:
        ms, faults = measure(fn, repeats)
        total += ms
        print(f"{name:58s} {ms:8.3f} ms {faults:8.0f} faults")
    print(f"{'  a step: all four':58s} {total:8.3f} ms   (PyTorch ops / loops: "
          f"{pytorch_total / total:.2f}x)")


if __name__ == "__main__":
    main()
