"""Time per batch of a validation loop under DKMCallback, with its snap cache and without.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf_validate.py

In eval mode a clustered weight is its snap to the nearest centroid. DKMCallback computes each
tensor's snap once per validation / test / predict loop (:mod:`lightning_dkm.engine.snap_cache`)
instead of in every batch's forward. This runs ``Trainer.validate`` on a stack of
``--layers`` ``Linear(--width, --width)`` clustered at 4 bits (``--batches`` batches of
``--batch-size``), alternately with the cache and with it switched off (the callback's
``_open_snap_cache`` made a no-op: the path before the cache), ``--repeats`` times each, and
prints the median process-CPU milliseconds per batch after the first (the first batch computes
the snaps either way) and their ratio, with the machine's load. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dkm import ClusterSpec, DKMCallback, attach, select_targets


class Stack(pl.LightningModule):
    """``layers`` Linear(width, width), validated on random inputs (an autoencoder loss)."""

    def __init__(self, width: int, layers: int, batches: int, batch_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(batches * batch_size, width, generator=g))
        self.batch_size = batch_size

    def forward(self, x):
        return self.body(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[0]))

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class Clock(pl.Callback):
    """Process CPU seconds per validation batch after the first."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            self.start, self.batches = time.process_time(), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if batch_idx >= 1:
            self.batches += 1
            self.seconds = time.process_time() - self.start


def validate(model: Stack, cached: bool) -> float:
    """One ``Trainer.validate``; seconds per batch after the first."""
    callback, clock = DKMCallback(bits=4, verbose=False, log_histograms=False), Clock()
    if not cached:
        callback._open_snap_cache = lambda trainer, pl_module: None  # the path before the cache
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[callback, clock])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model, verbose=False)
    return clock.seconds / clock.batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no banner per loop
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    model = Stack(args.width, args.layers, args.batches, args.batch_size)
    attach(model, select_targets(model, ClusterSpec(bits=4)), mode="soft")
    weights = sum(m.weight.numel() for m in model.body)
    load = os.getloadavg()
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for _ in range(args.repeats):
        for way in ("uncached", "cached"):
            times[way].append(validate(model, way == "cached"))
    ms = {way: 1e3 * statistics.median(t) for way, t in times.items()}
    result = {"command": "python benchmarks/perf_validate.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "clustered_weights": weights, "batches": args.batches,
              "batch_size": args.batch_size, "ms_per_batch_after_the_first": ms,
              "all_ms": {w: [round(1e3 * s, 2) for s in t] for w, t in times.items()},
              "ratio_uncached_over_cached": ms["uncached"] / ms["cached"],
              "load_average_before": load, "load_average_after": os.getloadavg()}
    print(f"{args.layers} x Linear({args.width}, {args.width}): {weights:,} clustered weights at "
          f"4 bits, {args.batches} batches of {args.batch_size}, {torch.get_num_threads()} "
          f"thread(s), process CPU, median of {args.repeats}: per batch after the first "
          f"{ms['uncached']:.1f} ms without the snap cache, {ms['cached']:.1f} ms with it "
          f"({result['ratio_uncached_over_cached']:.1f}x); load average {load[0]:.2f} -> "
          f"{result['load_average_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
