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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import DKM_BUDGET, MiniLMConfig, _quiet, run_minilm  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--average-bits", type=float, default=2.0)
    parser.add_argument("--results", type=Path, metavar="STUDY_JSON",
                        help="read the MiniLM rows of this accuracy study instead of running")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "budget_cost.json")
    args = parser.parse_args(argv)
    _quiet()
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
