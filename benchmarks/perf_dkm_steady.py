"""DKM's own forward and backward in a fit's steady state, without the model around it.

    python benchmarks/perf_dkm_steady.py                  # 2 and 4 bits, CPU clock, one thread
    python benchmarks/perf_dkm_steady.py --bits 4 --repeats 11 --json out.json

``perf_fit.py`` times what a user pays, but on a shared machine its DKM / plain ratio moves by
0.1 from one run to the next (docs/benchmarks.md), far more than a change to DKM's bookkeeping
saves. This script times only what DKM adds to a step, in the state a fit reaches: it trains
the digits CNN (``examples/digits.py``) for ``--epochs`` epochs with the default
``DKMCallback(bits=b)`` (its temperature, centroids and early stop), then times, ``--repeats``
times ``--steps`` steps, one clustering pass that reads every clustered weight (one batched
DKM call, as in training) followed by the backward of random gradients into those weights:
no convolution and no loss. After each timed step an untimed Adam step (the fit's learning
rate; fresh random gradients each step, so the weights walk rather than drift) moves the
weights as training does, so the centroids have to follow and DKM
runs the rounds a fit runs: without it the centroids converge and every tensor stops after one
round, which a fit does not do (the digits CNN runs all 3 at 4 bits, 2-3 at 2 bits). It
prints the median and the spread in ms per step and each tensor's iteration count in the last
step. Process CPU time and one thread by default (``--clock``, ``--threads``:
``benchmarks/clocks.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import clocks
from digits import DigitsCNN, DigitsDataModule

from lightning_dkm import DKMCallback, clustered_tensors
from lightning_dkm.engine.clustering_pass import clustering_pass, pass_members


def trained(bits: int, epochs: int) -> torch.nn.Module:
    """The digits CNN after ``epochs`` epochs of a default ``DKMCallback(bits=bits)`` fit, in
    train mode, its weights still clustered softly."""
    torch.manual_seed(0)
    model = DigitsCNN()
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        accelerator="cpu", devices=1,
        callbacks=[DKMCallback(bits=bits, finalize=False, log_histograms=False, verbose=False)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DigitsDataModule(batch_size=64))
    return model.train()


def time_steps(model: torch.nn.Module, steps: int, repeats: int,
               lr: float = 1e-3) -> tuple[list[float], list]:
    """ms per step of ``repeats`` runs of ``steps`` DKM steps (after 10 untimed ones), each
    followed by an untimed Adam step of ``lr`` on the clustered weights (random gradients,
    drawn anew before each step), and the iteration count of each tensor in the last pass."""
    members = pass_members(model)
    tensors = list(clustered_tensors(model).values())
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.original.shape, generator=generator) for t in tensors]
    optimizer = torch.optim.Adam([t.original for t in tensors], lr=lr)

    def step() -> tuple[float, list]:
        for grad in grads:
            grad.normal_(generator=generator)
        start = clocks.now()
        with clustering_pass(model, members=members) as current:
            weights = [getattr(t.module, t.param_name) for t in tensors]
            # each tensor's rounds in this pass (the pass's own record: a private field)
            iterations = [int(r.iterations) for r in current._results.values()]
        torch.autograd.backward(weights, grads)
        seconds = clocks.now() - start
        optimizer.step()  # the weights move as in training (untimed)
        optimizer.zero_grad(set_to_none=True)
        return seconds, iterations

    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        spent = 0.0
        for _ in range(steps):
            seconds, iterations = step()
            spent += seconds
        times.append(1e3 * spent / steps)
    return times, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the fit before timing")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (median reported)")
    clocks.add_arguments(parser)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clocks.apply(parser, args)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(clocks.describe_native(clocks.native_build()))
    rows = []
    for bits in args.bits:
        times, iterations = time_steps(trained(bits, args.epochs), args.steps, args.repeats)
        median = statistics.median(times)
        rows.append({"bits": bits, "ms_per_step": median, "all_ms": times,
                     "iterations": iterations})
        print(f"bits {bits}: DKM forward + backward {median:.2f} ms per step (runs "
              f"{min(times):.2f}-{max(times):.2f}), iterations per tensor {iterations}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "clock": args.clock,
                                         "threads": torch.get_num_threads(),
                                         "epochs": args.epochs, "steps": args.steps}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
