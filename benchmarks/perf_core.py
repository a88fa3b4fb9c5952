"""The DKM core's own time, side by side: with and without the attention's floor, and the three
step implementations on small tensors (what ``implementation="auto"`` chooses between).

    python benchmarks/perf_core.py                # both tables, one thread, CPU clock

**The floor** (``lightning_dkm.engine.weighted.LOGIT_FLOOR``): forward and backward of the
weighted core on ``U`` distinct values with counts (what the ``"unique"`` step runs per tensor),
``k`` centroids, tau 1e-2 in normalised units, max_iter 3, epsilon 0, the attention kept for the
backward; with the floor, then with the attention as it was before it (``torch.softmax`` of
the logits, whose far centroids underflow into subnormal numbers at a saturated attention).
It also counts the subnormal entries of the last round's attention.

**The steps** (``reference``: plain autograd; ``chunked``: the weighted core on the exact
weights; ``unique``: on their distinct float16 codes): forward and backward of one tensor of
``n`` weights (Gaussian, std 0.02), ``k`` centroids, cluster_dim ``d``, ``P`` palettes.

Medians of ``--repeats`` process-CPU timings after 3 warm-up calls; inputs are synthetic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lightning_dkm.engine.weighted as weighted
from lightning_dkm.engine.chunked import chunked_dkm_cluster
from lightning_dkm.engine.distinct import unique_dkm_cluster
from lightning_dkm.engine.kmeans import sq_distances
from lightning_dkm.engine.reference import dkm_cluster

STEP_CASES = ((2048, 4, 1, 1), (5120, 16, 1, 1), (16000, 16, 1, 1), (4096, 256, 1, 1),
              (8192, 16, 2, 1), (2048, 16, 1, 8), (16384, 64, 1, 1))
CORE_CASES = ((4096, 4), (4096, 16), (16384, 16))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def attention_before(xt: torch.Tensor, c: torch.Tensor, inv_tau, centroid_mask=None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``weighted.attention`` before the floor (#22): a plain softmax of the logits (in
    ``out`` where given, as the core asks for a kept round)."""
    z = sq_distances(xt, c).mul_(-inv_tau)
    if centroid_mask is not None:
        z.masked_fill_(~centroid_mask, float("-inf"))
    a = torch.softmax(z, dim=1)
    return a if out is None else out.copy_(a)


def core_row(U: int, k: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    xt = torch.randn(1, 1, U, generator=gen)
    counts = torch.randint(1, 100, (1, U), generator=gen).float()
    c0 = torch.linspace(-2, 2, k).reshape(1, k, 1)
    G = torch.randn(1, 1, U, generator=gen)
    inv_tau = torch.tensor(1 / 1e-2)

    def forward():
        return weighted.weighted_dkm(xt, counts, c0, inv_tau, max_iter=3, epsilon=0.0)

    def timed() -> tuple[float, float, int]:
        trajectory = forward()[2]
        last = weighted.attention(xt, trajectory.centroids[-2], inv_tau)
        subnormal = int(((last != 0) & (last.abs() < torch.finfo(last.dtype).tiny)).sum())
        return (median_ms(forward, repeats),
                median_ms(lambda: weighted.weighted_dkm_gradient(xt, counts, trajectory, G,
                                                                 inv_tau), repeats),
                subnormal)

    floored = weighted.attention
    try:
        with_floor = timed()
        weighted.attention = attention_before
        without = timed()
    finally:
        weighted.attention = floored
    return {"U": U, "k": k, "forward_ms": with_floor[0], "backward_ms": with_floor[1],
            "subnormal": with_floor[2], "forward_ms_no_floor": without[0],
            "backward_ms_no_floor": without[1], "subnormal_no_floor": without[2]}


def step_row(n: int, k: int, d: int, P: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(P, n, d, generator=gen) * 0.02).requires_grad_()
    c = torch.randn(P, k, d, generator=gen) * 0.02
    g = torch.randn(P, n, d, generator=gen)
    tau = torch.tensor(1e-2)
    row: dict[str, float] = {"P": P, "n": n, "k": k, "d": d}
    steps = {"reference": dkm_cluster, "chunked": chunked_dkm_cluster}
    if d == 1:
        steps["unique"] = unique_dkm_cluster
    for name, step in steps.items():
        def run(step=step):
            out = step(x, c, tau, max_iter=3, epsilon=0.0)
            (out.weights * g).sum().backward()
        row[f"{name}_ms"] = median_ms(run, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1; got {args.repeats}, {args.threads}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), process CPU ms, median of "
          f"{args.repeats}")
    print("\nthe weighted core, max_iter 3, tau 1e-2: with the floor | without")
    for U, k in CORE_CASES:
        r = core_row(U, k, args.repeats)
        print(f"U={U:>6,} k={k:>3}: forward {r['forward_ms']:.2f} backward {r['backward_ms']:.2f}"
              f" ({r['subnormal']} subnormal) | forward {r['forward_ms_no_floor']:.2f} backward "
              f"{r['backward_ms_no_floor']:.2f} ({r['subnormal_no_floor']} subnormal)")
    print("\none tensor, forward + backward, max_iter 3, tau 1e-2")
    for case in STEP_CASES:
        r = step_row(*case, args.repeats)
        times = "  ".join(f"{name} {r[f'{name}_ms']:.2f}" for name in
                          ("reference", "chunked", "unique") if f"{name}_ms" in r)
        print(f"P={r['P']} n={r['n']:>6,} k={r['k']:>3} d={r['d']}: {times}")


if __name__ == "__main__":
    main()
