"""What DKM's start costs: seeding every clustered tensor's centroids and calibrating its tau.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/perf_dkm_start.py --model minilm --bits 2 4 --clock cpu --threads 1

When DKM starts (``DKMCallback`` at its ``start_epoch``) every clustered tensor's centroids are
seeded by k-means of its weight and, with the default ``temperature="auto"``, its start and
end tau are found by bisection on the soft assignments' entropy
(:mod:`lightning_dkm.lightning.temperature`). Both run once per fit, before the first soft
step. This attaches DKM at ``--bits`` to the digits CNN or to the all-MiniLM-L6-v2 encoder's 36
Linear weights (as ``perf_epoch_end.py``) and times, side by side (alternating, the median of
``--repeats``):

* **seeding**: each tensor's own ``initialize`` one after the other, against
  ``initialize_many`` (what DKM's start runs: the scalar palettes of all tensors in one batched
  dynamic program); the centroids must be equal bit for bit;
* **calibration**: ``TemperatureConfig("auto").bounds`` of every tensor (the search on the
  floored entropy, the start and the end sharing one tensor's distances and common
  evaluations), against the plain search it replaced: two independent bisections of the same
  bracket on ``log_softmax``'s entropy with every ``exp`` taken as it is (reproduced here); the
  taus must be equal bit for bit.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clocks
from perf_epoch_end import clustered, model_arguments, parsed

from lightning_dkm.engine.parametrization import initialize_many
from lightning_dkm.lightning import temperature


def plain_tau(x: torch.Tensor, centroids: torch.Tensor, entropy_bits: float) -> float:
    """The calibration's search as it was: its own distances, the bracket's ends and every
    halving evaluated on the plain softmax entropy."""
    distances = temperature._distances(x, centroids, temperature.DEFAULT_MAX_POINTS)

    def entropy(tau: float) -> float:
        log_a = torch.log_softmax(distances / -tau, dim=1)
        return float(-(log_a.exp() * log_a).sum(1).mean() / math.log(2.0))

    low, high = math.log(temperature._TAU_LOW), math.log(temperature._TAU_HIGH)
    if entropy(temperature._TAU_LOW) >= entropy_bits:
        return temperature._TAU_LOW
    if entropy(temperature._TAU_HIGH) <= entropy_bits:
        return temperature._TAU_HIGH
    for _ in range(temperature._BISECTIONS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if entropy(math.exp(middle)) < entropy_bits else (low, middle)
    return math.exp(0.5 * (low + high))


def plain_bounds(x: torch.Tensor, centroids: torch.Tensor) -> tuple[float, float]:
    """The default config's ``(start, end)`` taus by :func:`plain_tau`."""
    top = math.log2(centroids.shape[1])
    return (plain_tau(x, centroids, temperature.DEFAULT_START_ENTROPY * top),
            plain_tau(x, centroids, min(temperature.DEFAULT_END_ENTROPY, 0.5 * top)))


def one_repeat(parametrizations: list, weights: list[torch.Tensor],
               config: temperature.TemperatureConfig) -> dict[str, float]:
    """One timing of each of the four, the results checked equal."""
    seconds = {}
    start = clocks.now()
    for p, w in zip(parametrizations, weights, strict=True):
        p.initialize(w)
    seconds["seed_each"] = clocks.now() - start
    each = [p.centroids.clone() for p in parametrizations]
    pairs = [(p, lambda w=w: w) for p, w in zip(parametrizations, weights, strict=True)]
    start = clocks.now()
    initialize_many(pairs)
    seconds["seed_many"] = clocks.now() - start
    if not all(torch.equal(a, p.centroids) for a, p in zip(each, parametrizations, strict=True)):
        raise RuntimeError("initialize_many's centroids differ from initialize's")
    palettes = [(p.to_palettes(w), p.centroids)
                for p, w in zip(parametrizations, weights, strict=True)]
    start = clocks.now()
    plain = [plain_bounds(x, c) for x, c in palettes]
    seconds["tau_plain"] = clocks.now() - start
    start = clocks.now()
    now = [config.bounds(x, c) for x, c in palettes]
    seconds["tau_now"] = clocks.now() - start
    if plain != now:
        raise RuntimeError("the calibrated taus differ from the plain search's")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parsed(model_arguments(__doc__), argv)
    print(f"{args.model}, {torch.get_num_threads()} threads, {args.clock} clock, median of "
          f"{args.repeats}")
    config = temperature.TemperatureConfig.parse("auto")
    rows = []
    for bits in args.bits:
        tensors = clustered(args.model, bits, seeded=False)
        parametrizations = [t.parametrization for t in tensors.values()]
        weights = [t.full_original() for t in tensors.values()]
        runs = [one_repeat(parametrizations, weights, config) for _ in range(args.repeats)]
        times = {name: [run[name] for run in runs] for name in runs[0]}
        row = {"bits": bits, "tensors": len(tensors),
               "weights": sum(w.numel() for w in weights),
               **{name: statistics.median(values) for name, values in times.items()},
               "all": times}
        rows.append(row)
        print(f"{bits} bits, {len(tensors)} tensors, {row['weights']:,} weights: seeding "
              f"{row['seed_each']:.3f} s one by one, {row['seed_many']:.3f} s batched "
              f"({row['seed_each'] / row['seed_many']:.1f}x); tau calibration "
              f"{row['tau_plain']:.3f} s plain, {row['tau_now']:.3f} s now "
              f"({row['tau_plain'] / row['tau_now']:.1f}x); centroids and taus equal",
              flush=True)
    return clocks.result(args, model=args.model, repeats=args.repeats, rows=rows)


if __name__ == "__main__":
    main()
