"""The Hessian diagonal of ``average_bits`` by a double backward or by a finite difference (#24).

``post_training.hessian_diagonal`` takes Hutchinson's :math:`Hz` by a second backward through
the gradient; ``post_training.hessian_diagonal_fd`` by the central difference of two plain
gradients at :math:`w \\pm \\epsilon z` (the same :math:`z`). For each part (the accuracy
study's MiniLM with its whole encoder clustered, the char-LM) and seed this takes both on what
``allocation_curvature`` reads (the first ``SENSITIVITY_SAMPLES`` samples of the seed's first
training batch), side by side in one process, alternating which goes first, and prints:

* the process CPU seconds of each (``--repeats`` times each, after one untimed call of each;
  the machine may be shared, so only the two columns of one run compare);
* the difference per tensor, :math:`\\lVert h_{fd} - h \\rVert / \\lVert h \\rVert`;
* the widths ``plan_widths`` chooses with each at every ``--budgets`` budget (as the study's
  ``_budget_init``), and whether they are identical.

And, on a small tanh network whose first and last weights are stored ``s`` and ``1/s`` times
their size (the same function, weights of scales ``s**2`` apart), the same difference per
tensor for each ``--scales`` ``s`` and ``--steps`` step: the one step of all tensors is large
against the small ones' scale and small against the large ones' rounding; and on the same
network with ReLU (piecewise linear: a difference across its kinks sees curvature that the
double backward, whose ReLU has second derivative 0, does not); and (``--mlp-only``: only
this) a 256-512-512-512-10 MLP with ReLU and with GELU, trained 30 Adam steps on random
data, both estimates on 8 samples and ``plan_widths``' widths at each budget from each.

Writes ``benchmarks/results/hessian_fd.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hessian_fd.py \\
        --charlm-cache /tmp/lead/cache/charlm_pretrained.ckpt
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import (  # noqa: E402
    CharLMConfig,
    MiniLMConfig,
    _calibration_loss,
    _quiet,
    charlm_task,
    minilm_task,
)

from lightning_dkm.engine.layout import ClusterSpec  # noqa: E402
from lightning_dkm.model.bit_budget import SENSITIVITY_SAMPLES, plan_widths  # noqa: E402
from lightning_dkm.model.post_training import (  # noqa: E402
    first_samples,
    hessian_diagonal,
    hessian_diagonal_fd,
)
from lightning_dkm.model.targets import select_targets  # noqa: E402


def compare(task, cfg, seeds, budgets, repeats: int, log) -> list[dict]:
    model = task.fresh()
    targets = select_targets(model, ClusterSpec(), targets=task.targets)
    weights = {t.name: model.get_parameter(t.name) for t in targets}
    names = list(weights)
    loss_fn = _calibration_loss(task)
    rows = []
    for seed in seeds:
        batch = next(iter(task.calibration(seed, 1, cfg.batch_size)))
        batches = [first_samples(batch, SENSITIVITY_SAMPLES)]
        ways = {"double_backward": lambda b=batches, s=seed: hessian_diagonal(
                    model, b, loss_fn, names, seed=s),
                "finite_difference": lambda b=batches, s=seed: hessian_diagonal_fd(
                    model, b, loss_fn, names, seed=s)}
        cpu: dict[str, list[float]] = {way: [] for way in ways}
        out = {}
        if seed == seeds[0]:  # untimed: the first call of each pays for allocations
            for way in ways:
                ways[way]()
        for r in range(repeats):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]
            for way in order:
                c0 = time.process_time()
                out[way] = ways[way]()
                cpu[way].append(round(time.process_time() - c0, 3))
        old, new = out["double_backward"], out["finite_difference"]
        errors = {n: float((new[n] - old[n]).norm() / old[n].norm().clamp_min(1e-30))
                  for n in names}
        widths = {}
        for budget in budgets:
            a = plan_widths(targets, weights, budget, sensitivity=old, seed=seed).bits
            b = plan_widths(targets, weights, budget, sensitivity=new, seed=seed).bits
            widths[str(budget)] = {"identical": a == b, "double_backward": a,
                                   "finite_difference": b}
        rms = [float(w.detach().pow(2).mean().sqrt()) for w in weights.values()]
        row = {"part": task.name, "seed": seed, "tensors": len(names), "cpu_s": cpu,
               "weight_rms_range": [min(rms), max(rms)],
               "max_relative_error": max(errors.values()),
               "median_relative_error": sorted(errors.values())[len(errors) // 2],
               "widths": widths}
        log(f"{task.name} seed {seed}: CPU s double backward {cpu['double_backward']}, "
            f"finite difference {cpu['finite_difference']}; relative error per tensor max "
            f"{row['max_relative_error']:.2e}, median {row['median_relative_error']:.2e}; "
            "widths identical at " + ", ".join(
                f"{b}: {w['identical']}" for b, w in widths.items()))
        rows.append(row)
    return rows


def scale_study(scales, steps, log) -> list[dict]:
    """The difference against the double backward per tensor on a small tanh network whose
    first layer's weights are stored ``s`` times, its last ``1/s`` times their size (each
    layer divides by its factor: the same function, the same curvature per unit of the
    function's weights), and on the same network with ReLU at ``s = 1``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Stored(nn.Linear):  # computes with weight / factor
        def __init__(self, fan_in: int, fan_out: int, factor: float) -> None:
            super().__init__(fan_in, fan_out, bias=False)
            self.factor = factor
            with torch.no_grad():
                self.weight.mul_(factor)

        def forward(self, x):
            return F.linear(x, self.weight / self.factor)

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 16, generator=generator),
                torch.randint(0, 8, (64,), generator=generator)) for _ in range(2)]

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    names = ["0.weight", "2.weight", "4.weight"]
    rows = []
    for activation, scale in [("tanh", s) for s in scales] + [("relu", 1.0)]:
        torch.manual_seed(0)
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        model = nn.Sequential(Stored(16, 32, scale), act(), Stored(32, 32, 1.0), act(),
                              Stored(32, 8, 1 / scale))
        exact = hessian_diagonal(model, batches, loss_fn, names, seed=0)
        rms = [float(model.get_parameter(n).detach().pow(2).mean().sqrt()) for n in names]
        for step in steps:
            fd = hessian_diagonal_fd(model, batches, loss_fn, names, seed=0, step=step)
            errors = {n: float((fd[n] - exact[n]).norm() / exact[n].norm().clamp_min(1e-30))
                      for n in names}
            rows.append({"activation": activation, "scale": scale, "rms": rms, "step": step,
                         "relative_error": errors})
            log(f"{activation}, scale {scale:g} (rms " + ", ".join(f"{r:.2g}" for r in rms)
                + f"), step {step:g}: relative error per tensor " + ", ".join(
                f"{n} {e:.1e}" for n, e in errors.items()))
    return rows


def mlp_study(seeds, budgets, steps, log) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    rows = []
    for act in (nn.ReLU, nn.GELU):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), act(), nn.Linear(512, 512), act(),
                              nn.Linear(512, 512), act(), nn.Linear(512, 10))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(512, 256, generator=generator)
        y = torch.randint(0, 10, (512,), generator=generator)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(30):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        batches = [(x[:SENSITIVITY_SAMPLES], y[:SENSITIVITY_SAMPLES])]

        def loss_fn(model, batch):
            return F.cross_entropy(model(batch[0]), batch[1])

        targets = select_targets(model, ClusterSpec(), min_size=1)
        weights = {t.name: model.get_parameter(t.name) for t in targets}
        names = list(weights)
        for seed in seeds:
            exact = hessian_diagonal(model, batches, loss_fn, names, seed=seed)
            for step in steps:
                fd = hessian_diagonal_fd(model, batches, loss_fn, names, seed=seed, step=step)
                errors = [float((fd[n] - exact[n]).norm() / exact[n].norm()) for n in names]
                identical = {str(b): plan_widths(targets, weights, b, sensitivity=exact,
                                                 seed=seed).bits
                             == plan_widths(targets, weights, b, sensitivity=fd,
                                            seed=seed).bits for b in budgets}
                rows.append({"activation": act.__name__, "seed": seed, "step": step,
                             "relative_error": errors, "identical": identical})
                log(f"MLP {act.__name__}, seed {seed}, step {step:g}: relative error per "
                    "tensor " + ", ".join(f"{e:.1e}" for e in errors)
                    + "; widths identical at " + ", ".join(
                        f"{b}: {same}" for b, same in identical.items()))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("minilm", "charlm"),
                        default=["minilm", "charlm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--minilm-targets", nargs="+", default=["encoder.encoder.layer.*"])
    parser.add_argument("--charlm-cache", default=CharLMConfig.cache)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--steps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--mlp-only", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "hessian_fd.json")
    args = parser.parse_args(argv)
    _quiet()

    def log(message: str) -> None:
        print(message, flush=True)

    mlp = mlp_study(args.seeds, args.budgets, args.steps[1:], log)
    if args.mlp_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"mlp": mlp}, indent=1) + "\n")
        return {"mlp": mlp}
    scales = scale_study(args.scales, args.steps, log)
    rows = []
    for part in args.parts:
        if part == "minilm":
            cfg = MiniLMConfig(targets=tuple(args.minilm_targets))
            task = minilm_task(cfg, log=lambda *a: None)
        else:
            cfg = CharLMConfig(cache=args.charlm_cache)
            task = charlm_task(cfg, log=lambda *a: None)
        rows += compare(task, cfg, args.seeds, args.budgets, args.repeats, log)
    identical = all(w["identical"] for row in rows for w in row["widths"].values())
    for part in args.parts:
        mine = [row for row in rows if row["part"] == part]
        old = sorted(itertools.chain.from_iterable(r["cpu_s"]["double_backward"] for r in mine))
        new = sorted(itertools.chain.from_iterable(r["cpu_s"]["finite_difference"]
                                                   for r in mine))
        log(f"{part}: median CPU s double backward {old[len(old) // 2]}, finite difference "
            f"{new[len(new) // 2]}")
    log(f"allocations identical everywhere: {identical}")
    result = {"command": "python benchmarks/hessian_fd.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "identical": identical, "rows": rows, "scales": scales,
              "mlp": mlp}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
