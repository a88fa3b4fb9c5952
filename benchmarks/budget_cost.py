"""What ``average_bits`` costs on MiniLM (#24: under 5 % of the fit's time).

The allocation is what ``DKMCallback(average_bits=...)`` adds when DKM starts: the Hessian
diagonal of the training loss on ``SENSITIVITY_BATCHES`` training batches and
``plan_widths`` (each tensor's k-means error at every width, then the knapsack). This runs the
accuracy study's MiniLM part (its model, layer-0 targets, data and 32-step DKM fine-tune) with
uniform 2-bit DKM and ``average_bits=2`` for each seed, one after the other (interleaved), and
prints the allocation's seconds against the fit's (the training steps of the same run), wall
clock and (where the run recorded it) process CPU, with the machine's load beside them.
Writes ``benchmarks/results/budget_cost.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/budget_cost.py

``--results STUDY.json`` reads the same figures from the MiniLM rows of an accuracy study run
with ``--average-bits`` instead of running one (every ``dkm_average_bits`` row records its
allocation's seconds beside its own fit's).

``--lightning`` measures what a user waits for instead: the same model, data, trainable
parameters, optimizer and 32 steps as a ``LightningModule`` fitted by ``Trainer.fit`` with
``DKMCallback(bits=2, targets=<the whole encoder>)``, once at its default (``average_bits=
"bits"``: the allocation runs at setup) and once with ``average_bits=None`` (uniform widths, no
allocation), interleaved per seed. For each it prints ``Trainer.fit``'s seconds (setup, DKM's
seeding k-means, the steps, the final snap and report) and the training steps' (first batch
start to last batch end), with the allocation's own seconds (``plan_fit_widths``: the Hessian
and ``plan_widths``, timed inside the fit) against both. Writes
``benchmarks/results/budget_cost_lightning.json``.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/budget_cost.py --lightning
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import (  # noqa: E402
    DKM_BUDGET,
    MINILM_ENCODER,
    MiniLMConfig,
    _quiet,
    _trainable,
    minilm_task,
    run_minilm,
)

#: The clustered tensors of ``--lightning``: every Linear weight of MiniLM's encoder (36), as
#: the study's cost runs (``--minilm-targets 'encoder.encoder.layer.*'``).
ENCODER = MINILM_ENCODER


def _clock() -> tuple[float, float, float, int]:
    """Wall and process CPU seconds, and of the CPU the kernel's share (system time) with the
    minor page faults so far: first touches of fresh memory, whose cost on this machine's VM
    varies several-fold from run to run (docs/results.md)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), time.process_time(), usage.ru_stime, usage.ru_minflt


def _since(start: tuple[float, float, float, int]) -> dict[str, float]:
    wall, cpu, system, faults = _clock()
    return {"wall_s": round(wall - start[0], 3), "cpu_s": round(cpu - start[1], 3),
            "system_s": round(system - start[2], 3), "minor_faults": faults - start[3]}


def lightning_fit(task, cfg: MiniLMConfig, seed: int, average_bits) -> dict:
    """One ``Trainer.fit`` of the study's MiniLM distillation with ``DKMCallback(bits=2,
    average_bits=average_bits)`` on the encoder: its seconds, its steps' seconds and (with an
    allocation) the allocation's seconds, wall and process CPU."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_dkm import DKMCallback
    from lightning_dkm.engine.layout import ClusterSpec
    from lightning_dkm.engine.parametrization import DKMParametrization
    from lightning_dkm.lightning import callback as callback_module
    from lightning_dkm.model.targets import select_targets

    model = task.fresh()
    modules = [t.module_name for t in select_targets(model, ClusterSpec(),
                                                     targets=cfg.targets)]

    class Distillation(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # train mode, as the study's loop sets it: task.fresh() comes in eval mode, and
            # Lightning keeps a submodule's own mode, where DKM would snap instead of training
            self.model = model.train()

        def training_step(self, batch, batch_idx):
            return task.loss(self.model, tuple(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW(_trainable(self.model, cfg, modules), lr=cfg.lr,
                                     weight_decay=0.0)

    class Steps(pl.Callback):  # first batch start to last batch end
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.start = _clock()
                self.modes = {p.training for p in pl_module.modules()
                              if isinstance(p, DKMParametrization)}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seconds = _since(self.start)

    spent: list[dict[str, float]] = []
    original = callback_module.plan_fit_widths

    def timed(*args, **kwargs):
        start = _clock()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(_since(start))

    batches = task.batches(seed, cfg.steps, cfg.batch_size)
    dkm = DKMCallback(bits=2, average_bits=average_bits,
                      targets=[f"model.{t}" for t in cfg.targets],
                      seed=seed, verbose=False, log_histograms=False)
    steps = Steps()
    out_dir = tempfile.TemporaryDirectory()  # the report and the artifact fit end writes
    trainer = pl.Trainer(max_steps=cfg.steps, max_epochs=1, logger=False,
                         default_root_dir=out_dir.name,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1,
                         callbacks=[dkm, steps])
    callback_module.plan_fit_widths = timed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = _clock()
            trainer.fit(Distillation(), DataLoader(batches, batch_size=None))
            fit = _since(start)
    finally:
        callback_module.plan_fit_widths = original
        out_dir.cleanup()
    if steps.modes != {True}:  # what the fit measured must be DKM's training step
        raise RuntimeError(f"the clustered tensors' training flags were {steps.modes} at the "
                           "first step, not train mode")
    allocation = dkm.bit_allocation
    return {"seed": seed, "average_bits": average_bits, "fit": fit, "steps": steps.seconds,
            "allocation": spent[0] if spent else None,
            "widths": None if allocation is None else allocation.bits,
            "sensitivity": None if allocation is None else allocation.sensitivity}


def lightning_main(args) -> dict:
    """``--lightning``: default and uniform fits per seed, interleaved (module docstring)."""
    cfg = MiniLMConfig(targets=ENCODER)
    if args.tiny:  # seconds: checks the pipeline, not the figures
        tiny = MiniLMConfig.tiny()
        cfg = MiniLMConfig(targets=("encoder.encoder.layer.0.*",),
                           train_sentences=tiny.train_sentences,
                           heldout_sentences=tiny.heldout_sentences, steps=2,
                           batch_size=tiny.batch_size)
    task = minilm_task(cfg, log=lambda m: None)
    load_before = os.getloadavg()
    runs = []
    for seed in args.seeds:
        uniform = lightning_fit(task, cfg, seed, None)
        default = lightning_fit(task, cfg, seed, "bits")
        spent = default["allocation"]
        ratios = {clock: {"of_fit": spent[clock] / default["fit"][clock],
                          "of_steps": spent[clock] / default["steps"][clock],
                          "fit_over_uniform_fit": default["fit"][clock] / uniform["fit"][clock]}
                  for clock in ("wall_s", "cpu_s")}
        runs.append({"seed": seed, "default": default, "uniform": uniform, "ratios": ratios})
        cpu = ratios["cpu_s"]
        print(f"seed {seed}: allocation {spent['cpu_s']:.2f} s CPU ({spent['wall_s']:.2f} s "
              f"wall) in a fit of {default['fit']['cpu_s']:.1f} s CPU, its {cfg.steps} steps "
              f"{default['steps']['cpu_s']:.1f} s: {100 * cpu['of_fit']:.1f} % of the fit, "
              f"{100 * cpu['of_steps']:.1f} % of the steps (wall: "
              f"{100 * ratios['wall_s']['of_fit']:.1f} / "
              f"{100 * ratios['wall_s']['of_steps']:.1f} %); the uniform fit beside it "
              f"{uniform['fit']['cpu_s']:.1f} s CPU; the allocation's system time "
              f"{spent['system_s']:.2f} s for {spent['minor_faults']:,} page faults", flush=True)
    result = {"command": "python benchmarks/budget_cost.py " + " ".join(sys.argv[1:]),
              "steps": cfg.steps, "batch_size": cfg.batch_size, "targets": list(cfg.targets),
              "threads": torch.get_num_threads(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "runs": runs}
    print(f"load average before {load_before}, after {result['load_average_after']}")
    out = args.out or ROOT / "benchmarks" / "results" / "budget_cost_lightning.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--average-bits", type=float, default=2.0)
    parser.add_argument("--results", type=Path, metavar="STUDY_JSON",
                        help="read the MiniLM rows of this accuracy study instead of running")
    parser.add_argument("--lightning", action="store_true",
                        help="time Trainer.fit with DKMCallback's default against uniform widths")
    parser.add_argument("--tiny", action="store_true",
                        help="--lightning on 2 steps of 8 sentences, encoder layer 0 (a smoke "
                             "test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/budget_cost.json "
                             "(--lightning: budget_cost_lightning.json)")
    args = parser.parse_args(argv)
    _quiet()
    if args.lightning:
        return lightning_main(args)
    args.out = args.out or ROOT / "benchmarks" / "results" / "budget_cost.json"
    cfg = MiniLMConfig(bits=(round(args.average_bits),), methods=("dkm",),
                       seeds=tuple(args.seeds), average_bits=(args.average_bits,))
    load_before = os.getloadavg()
    if args.results is not None:
        study = json.loads(args.results.read_text())
        rows, setup = study["minilm"], study["config"]["minilm"]
    else:
        rows, setup = run_minilm(cfg, log=lambda m: print(m, flush=True)), vars(cfg)
    runs = []
    for row in rows:
        if row["method"] != DKM_BUDGET:
            continue
        parts = row["allocation_seconds"]
        sensitivity = parts.get("sensitivity", parts.get("fisher"))  # (older runs: "fisher")
        allocation = sensitivity + parts["plan_widths"]
        uniform = next((r for r in rows if r["method"] == "dkm" and r["seed"] == row["seed"]
                        and r["bits"] == round(row["bits"])), None)
        cpu = None  # process CPU seconds (runs since #24's cheaper allocation record them)
        if "sensitivity_cpu" in parts and "train_cpu_seconds" in row:
            cpu = {"sensitivity_s": parts["sensitivity_cpu"],
                   "plan_widths_s": parts["plan_widths_cpu"],
                   "allocation_s": parts["sensitivity_cpu"] + parts["plan_widths_cpu"],
                   "fit_train_s": row["train_cpu_seconds"]}
            cpu["ratio"] = cpu["allocation_s"] / cpu["fit_train_s"]
        runs.append({"seed": row["seed"], "average_bits": row["bits"],
                     "sensitivity_s": sensitivity, "plan_widths_s": parts["plan_widths"],
                     "allocation_s": allocation, "fit_train_s": row["train_seconds"],
                     "ratio": allocation / row["train_seconds"], "cpu": cpu,
                     "uniform_bits": None if uniform is None else uniform["bits"],
                     "uniform_fit_train_s": None if uniform is None else uniform["train_seconds"]})
    result = {"command": "python benchmarks/budget_cost.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "steps": setup["steps"], "batch_size": setup["batch_size"],
              "targets": list(setup["targets"]),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "runs": runs}
    for run in runs:
        line = (f"seed {run['seed']}, average_bits={run['average_bits']:g}: allocation "
                f"{run['allocation_s']:.2f} s (sensitivity {run['sensitivity_s']:.2f} s + "
                f"plan_widths "
                f"{run['plan_widths_s']:.2f} s) vs the fit's {setup['steps']} training steps "
                f"{run['fit_train_s']:.1f} s: {100 * run['ratio']:.1f} %")
        if run["cpu"] is not None:
            line += (f"; process CPU: allocation {run['cpu']['allocation_s']:.2f} s "
                     f"(sensitivity {run['cpu']['sensitivity_s']:.2f} s + plan_widths "
                     f"{run['cpu']['plan_widths_s']:.2f} s) vs training "
                     f"{run['cpu']['fit_train_s']:.1f} s: {100 * run['cpu']['ratio']:.1f} %")
        if run["uniform_fit_train_s"] is not None:
            line += (f" (the uniform {run['uniform_bits']}-bit fit's "
                     f"{run['uniform_fit_train_s']:.1f} s: "
                     f"{100 * run['allocation_s'] / run['uniform_fit_train_s']:.1f} %)")
        print(line)
    if args.results is not None:
        result["command"] += f"  (rows of {args.results.name}: {study['command']})"
    print(f"load average before {load_before}, after {result['load_average_after']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
