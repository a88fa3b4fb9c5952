"""Where ``average_bits``' allocation spends its seconds on the accuracy study's MiniLM (#24).

The allocation (``DKMCallback(average_bits=...)`` at setup, the study's ``_budget_init``) is
the Hutchinson Hessian diagonal of the training loss on a few training batches and
``plan_widths``. This times, on the study's MiniLM part with the whole encoder clustered
(``encoder.encoder.layer.*``, 36 Linear weights), seed 0:

* one plain training step of the fp32 model (forward + backward of the clustered layers'
  parameters, AdamW step excluded): the unit the other figures are counted in;
* per Hutchinson batch its three passes: the forward, the backward with ``create_graph`` and
  the second backward (the Hessian-vector product), at the study's 16 samples and at fewer;
  and the library's whole call (``allocation_curvature``: the probes, the checks) at each;
* ``plan_widths`` whole and the exact 1-D k-means of every width inside it (one program for
  all widths, ``kmeans_widths``).

Each figure is the median of ``--repeats`` runs, wall and process-CPU seconds, one thread
(``OMP_NUM_THREADS=1``), with the load average beside them. Writes
``benchmarks/results/budget_profile.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/budget_profile.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_study import MINILM_ENCODER, MiniLMConfig, _quiet, minilm_task  # noqa: E402

from lightning_dkm.engine.layout import ClusterSpec  # noqa: E402
from lightning_dkm.model import bit_budget  # noqa: E402
from lightning_dkm.model.targets import select_targets  # noqa: E402

ENCODER = MINILM_ENCODER


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """The median wall and CPU seconds of ``repeats`` calls of ``fn`` and its last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": round(statistics.median(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3)}, out


def hutchinson_passes(model, loss, params, repeats: int) -> dict[str, dict[str, float]]:
    """The seconds of one Hutchinson batch's three passes, each timed on its own (the
    forward alone; forward + create_graph backward; all three), as differences."""
    def forward():
        return loss(model)

    def first():
        return torch.autograd.grad(loss(model), params, create_graph=True)

    def both():
        grads = torch.autograd.grad(loss(model), params, create_graph=True)
        zs = [torch.randint(0, 2, p.shape).to(p) * 2 - 1 for p in params]
        return torch.autograd.grad(grads, params, grad_outputs=zs)

    with torch.enable_grad():
        f, _ = timed(forward, repeats)
        g, _ = timed(first, repeats)
        h, _ = timed(both, repeats)
    return {"forward": f,
            "backward_create_graph": {k: round(g[k] - f[k], 3) for k in f},
            "second_backward": {k: round(h[k] - g[k], 3) for k in f},
            "total": h}


def plain_step(model, loss, params, repeats: int) -> dict[str, float]:
    """One training step's forward and backward (gradients of ``params`` only)."""
    def step():
        return torch.autograd.grad(loss(model), params)

    with torch.enable_grad():
        return timed(step, repeats)[0]


def plan_widths_parts(targets, weights, hessian, average_bits: float, repeats: int
                      ) -> dict[str, Any]:
    """``plan_widths`` whole, and the seconds its scalar k-means (one program for every
    width, ``kmeans_widths``) takes inside it."""
    spent: list[tuple[float, float]] = []
    original = bit_budget.kmeans_widths

    def counted(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = original(*args, **kwargs)
        spent.append((time.perf_counter() - t, time.process_time() - c))
        return out

    bit_budget.kmeans_widths = counted
    try:
        whole, allocation = timed(lambda: bit_budget.plan_widths(
            targets, weights, average_bits, sensitivity=hessian), repeats)
    finally:
        bit_budget.kmeans_widths = original
    return {"whole": whole,
            "kmeans_all_widths": {"wall_s": round(sum(w for w, _ in spent) / repeats, 3),
                                  "cpu_s": round(sum(c for _, c in spent) / repeats, 3)},
            "widths": allocation.bits}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 8, 4],
                        help="samples per Hutchinson batch to time (the study's batch: 16)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "budget_profile.json")
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    cfg = MiniLMConfig(targets=ENCODER)
    task = minilm_task(cfg, log=lambda m: None)
    model = task.fresh().eval()
    targets = select_targets(model, ClusterSpec(), targets=task.targets)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    params = list(weights.values())
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    batch = task.batches(0, 1, cfg.batch_size)[0]
    out: dict[str, Any] = {"command": "python benchmarks/budget_profile.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "targets": list(ENCODER),
        "load_average_before": os.getloadavg(), "batch_size": cfg.batch_size}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        for n in args.samples:
            part = tuple(t[:n] for t in batch)
            loss = lambda m, part=part: task.loss(m, part)  # noqa: E731
            out[f"plain_step_{n}"] = plain_step(model, loss, params, args.repeats)
            out[f"hutchinson_{n}"] = hutchinson_passes(model, loss, params, args.repeats)
            print(f"{n} samples: plain step {out[f'plain_step_{n}']}, Hutchinson "
                  f"{out[f'hutchinson_{n}']}", flush=True)
    from lightning_dkm.model.post_training import allocation_curvature, hessian_diagonal
    for p in model.parameters():  # as the callback finds them: allocation_curvature sets them
        p.requires_grad_(True)
    for n in args.samples:  # what the library's call takes, probes and checks included
        out[f"allocation_curvature_{n}"], _ = timed(lambda n=n: allocation_curvature(
            model, task.calibration(0, 1, cfg.batch_size), lambda m, b: task.loss(m, tuple(b)),
            list(weights), 1, n, seed=0), args.repeats)
        print(f"allocation_curvature, first {n} samples: "
              f"{out[f'allocation_curvature_{n}']}", flush=True)
    loader = task.calibration(0, 2, cfg.batch_size)
    hessian = hessian_diagonal(model, loader, lambda m, b: task.loss(m, tuple(b)),
                               list(weights), num_batches=2)
    for bits in (2.0, 3.0):
        out[f"plan_widths_{bits:g}"] = plan_widths_parts(targets, weights, hessian, bits,
                                                         args.repeats)
        print(f"plan_widths at {bits:g}: {out[f'plan_widths_{bits:g}']['whole']}, k-means "
              f"{out[f'plan_widths_{bits:g}']['kmeans_all_widths']}", flush=True)
    out["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
