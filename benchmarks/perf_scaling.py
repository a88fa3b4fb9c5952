"""Time and extra memory of one DKM forward + backward on a single weight tensor, for
n = 1e4 .. 1e7 weights and k = 2 .. 256 centroids (cluster_dim 1, max_iter 3, epsilon 0).

    python benchmarks/perf_scaling.py --json benchmarks/results/perf_scaling.json

Each n runs in a fresh subprocess that measures, for k in increasing order, the median time of
``--repeats`` forward+backward passes and the peak RSS above the process's RSS just before
(peak reset through /proc/self/clear_refs), i.e. the memory DKM needs beyond the weight, its
gradient and the upstream gradient. Cells whose work n*k exceeds ``--max-work`` are skipped
(printed as "-") to keep the run within minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.engine.kmeans import kmeans

STEPS = {"chunked": chunked_dkm_cluster, "unique": unique_dkm_cluster}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(n: int, ks: list[int], implementation: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = (torch.randn(1, n, 1) * 0.02).requires_grad_()
    g = torch.randn(1, n, 1)
    step = STEPS[implementation]
    rows = []
    for k in ks:
        sample = x.detach()[:, torch.randperm(n)[: min(n, 1 << 16)]]
        c = kmeans(sample, k, torch.Generator().manual_seed(0), max_iter=20).centroids
        step(x, c, 1e-2, max_iter=3, epsilon=0).weights.backward(g)  # warm-up
        x.grad = None
        base = _rss_mb("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step(x, c, 1e-2, max_iter=3, epsilon=0).weights.backward(g)
            times.append(time.perf_counter() - start)
            x.grad = None
        rows.append({"n": n, "k": k, "implementation": implementation,
                     "ms": 1e3 * statistics.median(times),
                     "extra_mb": max(_rss_mb("VmHWM:") - base, 0.0)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--k", nargs="+", type=int, default=[2, 4, 16, 64, 256])
    parser.add_argument("--implementations", nargs="+", default=["chunked", "unique"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-work", type=float, default=3e8, help="skip cells with n*k above")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        n, implementation, ks = int(args.child[0]), args.child[1], args.child[2]
        rows = measure(n, [int(k) for k in ks.split(",")], implementation, args.repeats)
        print(json.dumps(rows))
        return

    print(f"setup: torch {torch.__version__}, {torch.get_num_threads()} threads, cluster_dim 1, "
          f"max_iter 3, median of {args.repeats}")
    rows: list[dict] = []
    for implementation in args.implementations:
        for n in (int(v) for v in args.n):
            ks = [k for k in args.k if n * k <= args.max_work or implementation == "unique"]
            if not ks:
                continue
            cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", str(n),
                   implementation, ",".join(map(str, ks))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                rows.append(row)
                print(f"{implementation:8s} n={row['n']:>9,d} k={row['k']:>3d}  "
                      f"{row['ms']:9.1f} ms  extra {row['extra_mb']:8.1f} MB", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "max_work": args.max_work}, indent=2))


if __name__ == "__main__":
    main()
