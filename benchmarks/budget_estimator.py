"""Cheaper estimates for ``average_bits`` against the one the study's wins were measured with
(#24: the allocation under 5 % of the fit's time).

The reference is what ``DKMCallback(average_bits=...)`` computed when the study measured its
wins: the Hutchinson Hessian diagonal on 2 training batches of the study's 16 samples, one
Rademacher probe each, and ``plan_widths`` clustering scalar palettes on a grid of 1/2048 of
their unit. Each candidate changes one of those (fewer batches; only the first samples of a
batch, the Hessian-vector product costing in proportion to them; a coarser grid, the exact
1-D k-means costing in proportion to its points) and is compared with the reference, per
model (MiniLM with its whole encoder clustered, the char-LM) and seed (the seed draws the
batches and the probes), by:

* the widths it chooses at ``average_bits`` 2 and 3: how many tensors get another width than
  the reference gives them;
* the Spearman correlation of its estimates with the reference's over every (tensor, width);
* its seconds (wall and process CPU, one thread): the Hessian's and ``plan_widths``'.

Writes ``benchmarks/results/budget_estimator.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/budget_estimator.py --charlm-cache /tmp/lead/cache/charlm_pretrained.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_study import (  # noqa: E402
    MINILM_ENCODER,
    CharLMConfig,
    MiniLMConfig,
    _calibration_loss,
    _quiet,
    charlm_task,
    minilm_task,
)
from scipy.stats import spearmanr  # noqa: E402

from lightning_dkm.engine.layout import ClusterSpec  # noqa: E402
from lightning_dkm.model import bit_budget  # noqa: E402
from lightning_dkm.model.post_training import hessian_diagonal  # noqa: E402
from lightning_dkm.model.targets import select_targets  # noqa: E402

#: (label, batches, samples per batch or None for all, grid) of the reference and candidates.
CANDIDATES = (
    ("reference: 2 batches, grid 1/2048", 2, None, 1 << 11),
    ("1 batch", 1, None, 1 << 11),
    ("1 batch, 8 samples", 1, 8, 1 << 11),
    ("1 batch, 4 samples", 1, 4, 1 << 11),
    ("2 batches, 4 samples", 2, 4, 1 << 11),
    ("grid 1/512", 2, None, 1 << 9),
    ("1 batch, 8 samples, grid 1/512", 1, 8, 1 << 9),
    ("1 batch, 4 samples, grid 1/512", 1, 4, 1 << 9),
)
BUDGETS = (2.0, 3.0)


@contextlib.contextmanager
def _grid(grid: int) -> Iterator[None]:
    """``plan_widths`` clusters scalar palettes on multiples of ``1 / grid`` inside."""
    saved = bit_budget._GRID
    bit_budget._GRID = grid
    try:
        yield
    finally:
        bit_budget._GRID = saved


def _first(batch: Any, samples: int | None) -> Any:
    return batch if samples is None else tuple(t[:samples] for t in batch)


def run(task: Any, batch_size: int, seeds: list[int], log: Any) -> dict[str, Any]:
    """Every candidate against the reference on ``task``, per seed."""
    loss_fn = _calibration_loss(task)
    out: dict[str, Any] = {}
    for seed in seeds:
        model = task.fresh().eval()
        targets = select_targets(model, ClusterSpec(), targets=task.targets)
        weights = {t.name: model.get_parameter(t.name) for t in targets}
        rows: dict[str, Any] = {}
        for label, batches, samples, grid in CANDIDATES:
            loader = [_first(b, samples)
                      for b in task.calibration(seed, batches, batch_size)]
            wall, cpu = time.perf_counter(), time.process_time()
            hessian = hessian_diagonal(model, loader, loss_fn, list(weights),
                                       num_batches=batches, seed=seed)
            hessian_s = (time.perf_counter() - wall, time.process_time() - cpu)
            plans, plan_s = {}, []
            with _grid(grid):
                for budget in BUDGETS:
                    wall, cpu = time.perf_counter(), time.process_time()
                    plans[budget] = bit_budget.plan_widths(targets, weights, budget,
                                                           sensitivity=hessian, seed=seed)
                    plan_s.append((time.perf_counter() - wall, time.process_time() - cpu))
            rows[label] = {
                "hessian_wall_s": round(hessian_s[0], 3), "hessian_cpu_s": round(hessian_s[1], 3),
                "plan_widths_wall_s": round(sum(s[0] for s in plan_s) / len(plan_s), 3),
                "plan_widths_cpu_s": round(sum(s[1] for s in plan_s) / len(plan_s), 3),
                "widths": {f"{b:g}": p.bits for b, p in plans.items()},
                "estimates": {t.name: {str(w): e for w, e in t.estimates.items()}
                              for t in plans[BUDGETS[0]].tensors},
            }
        reference = rows[CANDIDATES[0][0]]
        keys = [(n, w) for n, e in reference["estimates"].items() for w in e]
        for label, row in rows.items():
            row["spearman_vs_reference"] = float(spearmanr(
                [row["estimates"][n][w] for n, w in keys],
                [reference["estimates"][n][w] for n, w in keys])[0])
            row["widths_changed"] = {
                b: sorted(n for n, w in row["widths"][b].items() if w != reference["widths"][b][n])
                for b in row["widths"]}
            log(f"{task.name} seed {seed} {label:34s} Hessian {row['hessian_wall_s']:.2f} s "
                f"(CPU {row['hessian_cpu_s']:.2f}), plan_widths {row['plan_widths_wall_s']:.2f} s "
                f"(CPU {row['plan_widths_cpu_s']:.2f}); Spearman "
                f"{row['spearman_vs_reference']:.3f}; widths changed "
                + ", ".join(f"B={b}: {len(v)}" for b, v in row["widths_changed"].items()))
        out[str(seed)] = rows
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("minilm", "charlm"),
                        default=["minilm", "charlm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--charlm-cache", help="char-LM pretraining cache (accuracy_study's)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "budget_estimator.json")
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out: dict[str, Any] = {"command": "python benchmarks/budget_estimator.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "load_average_before": os.getloadavg()}
    if "minilm" in args.parts:
        cfg = MiniLMConfig(targets=MINILM_ENCODER)
        out["minilm_encoder"] = run(minilm_task(cfg, log=lambda m: None), cfg.batch_size,
                                    args.seeds, log)
    if "charlm" in args.parts:
        charlm = CharLMConfig()
        if args.charlm_cache:
            charlm.cache = args.charlm_cache
        out["charlm"] = run(charlm_task(charlm, log=lambda m: None), charlm.batch_size,
                            args.seeds, log)
    out["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
