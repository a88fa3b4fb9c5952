"""Which sensitivity should weigh ``average_bits``' estimate (#24)? Evidence on the accuracy
study's two models (seed 0, before any fine-tuning).

For every clustered tensor ``t`` and width ``b`` in 1..4 it measures the loss increase of
snapping ``t`` alone to its k-means palette at ``b`` (the palettes ``plan_widths`` computes),
on 8 held-out training batches (others than the sensitivity's), and compares it with the
estimate ``E_t(b) = 1/2 sum_i F_i (w_i - c_a(i))^2`` under each candidate sensitivity ``F``:

* ``none``: 1 for every weight (the squared error);
* ``fisher_dense``: squared gradients of the training loss at the unclustered weights (what
  ``average_bits`` used first; here without the noise check, which refuses it on MiniLM);
* ``fisher_clustered``: the same with every tensor snapped to its 2-bit palette, so the loss
  is where DKM starts rather than at its minimum;
* ``secant_clustered``: a per-tensor curvature along the clustering, ``g_t . d_t / |d_t|^2``
  with ``g`` the gradient at the snapped weights and ``d_t`` the snap's change of tensor t;
* ``hutchinson`` (and ``_4batch`` / ``_2batch`` / ``_1batch``): the Hessian diagonal at the
  unclustered weights (``post_training.hessian_diagonal``, what ``average_bits`` uses now);
* ``measured_1batch``: the loss increases themselves, measured on one sensitivity batch (one
  forward per tensor and width: the costliest, an oracle of sorts).

Columns: the Spearman correlation of estimate and measured increase over all (tensor, width)
pairs and over the tensors at each fixed width (what ranks tensors against each other), and
for ``average_bits`` 2 and 3 the measured loss of the whole allocation each estimate chooses
against uniform widths (all tensors snapped at once), and the seconds each sensitivity took
(process time, one thread). Writes ``benchmarks/results/budget_sensitivity.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/budget_sensitivity.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_study import (  # noqa: E402
    CharLMConfig,
    MiniLMConfig,
    _calibration_loss,
    _quiet,
    charlm_task,
    minilm_task,
)
from scipy.stats import spearmanr  # noqa: E402

from lightning_dkm.engine.layout import ClusterSpec  # noqa: E402
from lightning_dkm.engine.palette import stored_bytes  # noqa: E402
from lightning_dkm.model.bit_budget import _snap, allocate, budget_bytes  # noqa: E402
from lightning_dkm.model.post_training import (  # noqa: E402
    _summed_over_batches,
    fisher_diagonal,
    hessian_diagonal,
)
from lightning_dkm.model.targets import select_targets  # noqa: E402

WIDTHS = (1, 2, 3, 4)
BATCHES = 8
CLUSTER_BITS = 2  # the width every tensor is snapped at for the clustered-point candidates


def _loss(model, task, batches) -> float:
    with torch.no_grad():
        return sum(float(task.loss(model, b)) for b in batches) / len(batches)


@contextlib.contextmanager
def _snapped_in_place(weights, values):
    """Each ``weights[name]`` holds ``values[name]`` inside, its own values again after."""
    saved = {n: weights[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                weights[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                weights[n].copy_(v)


def mean_gradient(model, loader, loss_fn, names, num_batches):
    """The training loss's gradient of ``names``, summed over the first batches: the pass of
    ``fisher_diagonal`` / ``hessian_diagonal`` (eval mode, flags restored) with the gradient
    itself per batch."""
    def gradient(loss, params):
        return list(torch.autograd.grad(loss(), params, allow_unused=True))

    return _summed_over_batches(model, loader, loss_fn, names, num_batches, gradient,
                                "the loss gradient")


def study(task, batch_size: int, log) -> dict:
    model = task.fresh().eval()
    targets = select_targets(model, ClusterSpec(), targets=task.targets)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    names = list(weights)
    loss_fn = _calibration_loss(task)
    held = list(task.calibration(100, BATCHES, batch_size))

    def loader():
        return task.calibration(0, BATCHES, batch_size)

    snapped = dict(zip(names, _snap([(weights[n], t.layout, WIDTHS)
                                     for n, t in zip(names, targets, strict=True)], 0),
                       strict=True))

    def measure(batches, floor=-float("inf")):
        """Each (tensor, width)'s loss increase on ``batches`` when it alone is snapped."""
        base_c = _loss(model, task, batches)
        out = {}
        for n in names:
            for b in WIDTHS:
                with _snapped_in_place(weights, {n: snapped[n].weight(b)}):
                    out[(n, b)] = max(_loss(model, task, batches) - base_c, floor)
        return out

    base = _loss(model, task, held)
    measured = measure(held)
    log(f"{task.name}: held-out loss {base:.4g}; single-tensor increases "
        f"{min(measured.values()):.3g}..{max(measured.values()):.3g}")

    clustered = {n: snapped[n].weight(CLUSTER_BITS) for n in names}
    delta = {n: clustered[n] - weights[n].detach() for n in names}
    sens, seconds, estimates = {}, {}, {}

    def timed(label, fn):
        t = time.process_time()
        out = fn()
        seconds[label] = time.process_time() - t
        return out

    sens["none"] = None
    seconds["none"] = 0.0
    sens["fisher_dense"] = timed("fisher_dense", lambda: fisher_diagonal(
        model, loader(), loss_fn, names, BATCHES))
    with _snapped_in_place(weights, clustered):
        sens["fisher_clustered"] = timed("fisher_clustered", lambda: fisher_diagonal(
            model, loader(), loss_fn, names, BATCHES))
        g = timed("secant_clustered", lambda: mean_gradient(model, loader(), loss_fn, names,
                                                            BATCHES))
    sens["secant_clustered"] = {n: torch.full_like(weights[n], max(
        float((g[n] * delta[n]).sum() / delta[n].square().sum()), 1e-30)) for n in names}
    for k in (8, 4, 2, 1):
        label = "hutchinson" + ("" if k == BATCHES else f"_{k}batch")
        try:
            sens[label] = timed(label, lambda k=k: hessian_diagonal(model, loader(), loss_fn,
                                                                    names, k))
        except RuntimeError as err:  # an op without double backward
            log(f"hutchinson failed: {err}")
    for label, f in sens.items():
        estimates[label] = {(n, b): snapped[n].estimates(WIDTHS, None if f is None else f[n])[b]
                            for n in names for b in WIDTHS}

    estimates["measured_1batch"] = timed("measured_1batch",
                                         lambda: measure(list(loader())[:1], floor=0.0))
    layouts = {t.name: t.layout for t in targets}
    uniform = {}
    for bits in (2, 3):
        with _snapped_in_place(weights, {n: snapped[n].weight(bits) for n in names}):
            uniform[bits] = _loss(model, task, held) - base
    rows = {}
    for label, est in estimates.items():
        keys = list(measured)
        overall = spearmanr([est[k] for k in keys], [measured[k] for k in keys])[0]
        per_width = {b: float(spearmanr([est[(n, b)] for n in names],
                                        [measured[(n, b)] for n in names])[0]) for b in WIDTHS}
        alloc = {}
        for bits in (2, 3):
            budget = budget_bytes(layouts.values(), bits)
            options = {n: {b: (stored_bytes(layouts[n], "float16", b), est[(n, b)])
                           for b in WIDTHS} for n in names}
            chosen = allocate(options, budget)
            with _snapped_in_place(weights, {n: snapped[n].weight(chosen[n]) for n in names}):
                alloc[bits] = {"loss_increase": _loss(model, task, held) - base,
                               "uniform_loss_increase": uniform[bits], "widths": chosen}
        rows[label] = {"spearman_all": float(overall), "spearman_per_width": per_width,
                       "allocation": alloc, "seconds": round(seconds[label], 2)}
        log(f"  {label:28s} spearman all {overall:+.3f}, per width "
            + " ".join(f"{b}:{v:+.2f}" for b, v in per_width.items())
            + "; allocation loss increase "
            + ", ".join(f"B={b}: {v['loss_increase']:.4g} (uniform "
                        f"{v['uniform_loss_increase']:.4g})" for b, v in alloc.items())
            + f"; {seconds[label]:.2f} s")
    return {"held_out_loss": base,
            "measured": {f"{n}:{b}": v for (n, b), v in measured.items()}, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["minilm", "charlm"])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "budget_sensitivity.json")
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = {"command": "python benchmarks/budget_sensitivity.py " + " ".join(sys.argv[1:]),
           "load_average_before": os.getloadavg()}
    if "minilm" in args.parts:
        cfg = MiniLMConfig()
        out["minilm"] = study(minilm_task(cfg, log=lambda m: None), cfg.batch_size, log)
    if "charlm" in args.parts:
        cfg = CharLMConfig()
        out["charlm"] = study(charlm_task(cfg, log=lambda m: None), cfg.batch_size, log)
    out["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
