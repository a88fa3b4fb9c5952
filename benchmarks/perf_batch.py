"""When batching DKM across tensors pays: one ``unique_dkm_batch`` call vs one
``unique_dkm_cluster`` per tensor, side by side in one run.

    python benchmarks/perf_batch.py --clock cpu --threads 1
    python benchmarks/perf_batch.py --cases 524288:2:16 1048576:4:4 --clock cpu --threads 1

For each (weights per tensor n, tensors T, centroids k) it times the forward and backward of T
random tensors of n weights (cluster_dim 1, max_iter 3, epsilon 0), batched and alone,
interleaved, and prints the medians. ``lightning_dkm.engine.clustering_pass`` batches on CPU
only the tensors small enough to gain (``CPU_BATCH_MAX_ENTRIES``); this is what that rule rests on.

``--digits-cnn`` times instead the clustering pass of the digits CNN (``examples/digits.py``,
its clustered weights at ``--bits``, default 2): one forward and backward of its soft weights
with the small-model rule (``CPU_BATCH_MAX_TOTAL``: all of them one batch) and without it (each
weight by the per-weight rule), alternating step by step in one process.

    python benchmarks/perf_batch.py --digits-cnn --bits 2 --clock cpu --threads 1

``--digits-cnn --rounds`` times the same pass as one batch with the batch's rounds counted on
the host (a batch whose tensors all stopped at the same round picks its rounds as views, the
default since #22) and on the device (before: per-palette gathers of every round's state,
also where every tensor stopped together), alternating step by step; it raises where the two
give other soft weights or gradients.

    python benchmarks/perf_batch.py --digits-cnn --rounds --bits 4 --repeats 200 \\
        --clock cpu --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clocks

from lightning_dkm.engine.distinct import unique_dkm_batch, unique_dkm_cluster
from lightning_dkm.engine.numerics import EarlyStop

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


def _rounds_on_the_device(stop: EarlyStop) -> int | None:
    """:meth:`EarlyStop.rounds` before #22's host count: an int only where the loop counted
    on the host (no groups), else the per-palette counts on the device."""
    return stop.iterations if isinstance(stop.iterations, int) else None


def digits_cnn_pass(bits: int, repeats: int, rounds: bool = False) -> dict[str, float]:
    """Median milliseconds of the digits CNN's clustering pass (its soft weights, forward and
    backward) with and without the small-model rule, or (``rounds``) as one batch with its
    rounds counted on the host and on the device, alternating step by step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import digits_cnn

    from lightning_dkm import ClusterSpec, attach, clustering_pass, select_targets
    from lightning_dkm.engine import clustering_pass as pass_module

    torch.manual_seed(0)
    model = digits_cnn()
    attach(model, select_targets(model, ClusterSpec(bits=bits)))
    model.train()
    layers = [m for m in model if hasattr(m, "parametrizations")]
    grads = [torch.randn_like(m.weight) for m in layers]
    host_rounds = EarlyStop.rounds
    variants: dict[str, tuple[int, Callable]] = (
        {"rounds on the host": (pass_module.CPU_BATCH_MAX_TOTAL, host_rounds),
         "rounds on the device": (pass_module.CPU_BATCH_MAX_TOTAL, _rounds_on_the_device)}
        if rounds else
        {"one batch": (pass_module.CPU_BATCH_MAX_TOTAL, host_rounds),
         "per weight": (0, host_rounds)})

    def step(name: str) -> tuple[float, list[Tensor]]:
        pass_module.CPU_BATCH_MAX_TOTAL, EarlyStop.rounds = variants[name]
        # every variant starts each step from the same centroids (the pass keeps its final
        # ones), so that both compute the same thing
        saved = [m.parametrizations.weight[0].centroids.clone() for m in layers]
        start = clocks.now()
        with clustering_pass(model):
            weights = [m.weight for m in layers]
        torch.autograd.backward(weights, grads)
        seconds = clocks.now() - start
        out = [w.detach() for w in weights]
        for m, c in zip(layers, saved, strict=True):
            out.append(m.parametrizations.weight.original.grad)
            m.parametrizations.weight.original.grad = None
            m.parametrizations.weight[0].centroids.copy_(c)
        return seconds, out

    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for i in range(repeats + 3):
            results = []
            for name in variants:
                seconds, out = step(name)
                results.append(out)
                if i >= 3:  # three warm-up rounds
                    times[name].append(seconds)
            if rounds and not all(torch.equal(a, b) for a, b in zip(*results, strict=True)):
                raise AssertionError("the rounds counted on the host changed a soft weight or "
                                     "a gradient")
    finally:
        pass_module.CPU_BATCH_MAX_TOTAL, EarlyStop.rounds = variants[next(iter(variants))]
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--digits-cnn", action="store_true",
                        help="the digits CNN's pass with and without the small-model rule")
    parser.add_argument("--bits", type=int, default=2, help="with --digits-cnn")
    parser.add_argument("--rounds", action="store_true",
                        help="with --digits-cnn: the batch's rounds counted on the host vs on "
                             "the device")
    parser.add_argument("--cases", nargs="+", metavar="N:TENSORS:K",
                        help="the (weights per tensor, tensors, centroids) to time instead of "
                             "the default ones")
    clocks.add_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    clocks.apply(parser, args)
    print(f"threads {torch.get_num_threads()}, {args.clock} clock, torch {torch.__version__}")
    if args.rounds and not args.digits_cnn:
        parser.error("--rounds goes with --digits-cnn")
    if args.digits_cnn:
        r = digits_cnn_pass(args.bits, args.repeats, args.rounds)
        (a, ta), (b, tb) = r.items()
        print(f"digits CNN, {args.bits} bits: {a} {ta:.2f} ms, {b} {tb:.2f} ms, ratio "
              f"{ta / tb:.3f}")
        return
    cases = CASES
    if args.cases:
        try:
            cases = tuple(tuple(int(v) for v in case.split(":")) for case in args.cases)
        except ValueError:
            parser.error(f"--cases takes N:TENSORS:K triples of ints; got {args.cases}")
        if any(len(case) != 3 or min(case) < 1 for case in cases):
            parser.error(f"--cases takes N:TENSORS:K triples of ints >= 1; got {args.cases}")
    for n, tensors, k in cases:
        r = measure(n, tensors, k, args.repeats)
        print(f"n={n:>7,} tensors={tensors:>2} k={k:>2}: batched {r['batched']:7.1f} ms  "
              f"alone {r['alone']:7.1f} ms  ratio {r['batched'] / r['alone']:.2f}", flush=True)


if __name__ == "__main__":
    main()
