"""When batching DKM across tensors pays: one ``unique_dkm_batch`` call vs one
``unique_dkm_cluster`` per tensor, side by side in one run.

    python benchmarks/perf_batch.py --clock cpu --threads 1

For each (weights per tensor n, tensors T, centroids k) it times the forward and backward of T
random tensors of n weights (cluster_dim 1, max_iter 3, epsilon 0), batched and alone,
interleaved, and prints the medians. ``lightning_dkm.engine.clustering_pass`` batches on CPU
only the tensors small enough to gain (``CPU_BATCH_MAX_ENTRIES``); this is what that rule rests on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clocks

from lightning_dkm.engine.distinct import unique_dkm_batch, unique_dkm_cluster

CASES = ((16384, 24, 4), (16384, 24, 16), (65536, 12, 16), (262144, 6, 16))


def measure(n: int, tensors: int, k: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(1, n, 1, generator=gen) * 0.02).requires_grad_() for _ in range(tensors)]
    cs = [torch.linspace(-0.04, 0.04, k).reshape(1, k, 1) for _ in range(tensors)]
    taus = [torch.tensor(1e-2) for _ in range(tensors)]
    gs = [torch.randn(1, n, 1, generator=gen) for _ in range(tensors)]

    def batched() -> None:
        outs = unique_dkm_batch(xs, cs, taus, max_iter=3, epsilon=0.0)
        sum((o.weights * g).sum() for o, g in zip(outs, gs, strict=True)).backward()

    def alone() -> None:
        outs = [unique_dkm_cluster(x, c, t, max_iter=3, epsilon=0.0)
                for x, c, t in zip(xs, cs, taus, strict=True)]
        sum((o.weights * g).sum() for o, g in zip(outs, gs, strict=True)).backward()

    times: dict[str, list[float]] = {"batched": [], "alone": []}
    for i in range(repeats + 1):
        for name, run in (("batched", batched), ("alone", alone)):
            start = clocks.now()
            run()
            if i:  # the first round warms up
                times[name].append(clocks.now() - start)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    clocks.add_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    clocks.apply(parser, args)
    print(f"threads {torch.get_num_threads()}, {args.clock} clock, torch {torch.__version__}")
    for n, tensors, k in CASES:
        r = measure(n, tensors, k, args.repeats)
        print(f"n={n:>7,} tensors={tensors:>2} k={k:>2}: batched {r['batched']:7.1f} ms  "
              f"alone {r['alone']:7.1f} ms  ratio {r['batched'] / r['alone']:.2f}", flush=True)


if __name__ == "__main__":
    main()
