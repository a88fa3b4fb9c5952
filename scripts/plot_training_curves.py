"""Plot the DKM metrics of a real main-job run from its TensorBoard event files.

    bash scripts/dev.sh main                     # writes outputs/digits/tensorboard/version_N
    python scripts/plot_training_curves.py       # newest version_N -> docs/figures/...png
    python scripts/plot_training_curves.py --logdir outputs/digits/tensorboard/version_0

Reads the scalars with tensorboard's ``EventAccumulator`` and plots ``dkm/tau`` (per logged
optimizer step, on the epoch axis) and, per epoch, ``dkm/entropy`` (model and per layer),
``val_acc``, and per layer ``dkm/perplexity/<name>``,
``dkm/snap_rmse/<name>`` (divided by the weight standard deviation read from the
``dkm_weights/<name>`` histograms) and ``dkm/dead_clusters/<name>``. Also prints the values as a
table.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ROOT / "outputs" / "digits" / "tensorboard"
COMMAND = "python scripts/plot_training_curves.py"


def newest_run(runs: Path) -> Path:
    """The ``version_N`` directory with the largest N that holds DKM scalars."""
    versions = sorted(
        (p for p in runs.glob("version_*") if re.fullmatch(r"version_\d+", p.name)),
        key=lambda p: int(p.name.split("_")[1]),
        reverse=True,
    )
    for path in versions:
        if any(path.glob("events.out.tfevents.*")):
            tags = load(path)
            if "dkm/tau" in tags:
                return path
    raise SystemExit(f"no run with DKM scalars under {runs}; run `bash scripts/dev.sh main` first")


def load(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(epoch, value), ...]}`` for every scalar tag of the run; the epoch of a point
    is the value of the ``epoch`` scalar Lightning logs at the same global step."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    epoch_at = {e.step: int(e.value) for e in acc.Scalars("epoch")} if "epoch" in tags else {}
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for tag in tags:
        for event in acc.Scalars(tag):
            out[tag].append((epoch_at.get(event.step, event.step), event.value))
    return dict(out)


def tau_by_step(logdir: Path, num_epochs: int) -> list[tuple[float, float]]:
    """``[(fractional epoch, tau)]``: ``dkm/tau`` is logged per optimizer step (with the default
    ``interval: step``) or per epoch; either way on the epoch axis of the other panels."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("dkm/tau")
    if len(events) <= num_epochs:  # interval "epoch": one value per epoch, set at its start
        return [(float(i), e.value) for i, e in enumerate(events)]
    steps_per_epoch = (events[-1].step + 1) / num_epochs
    return [(e.step / steps_per_epoch, e.value) for e in events]


def weight_std(logdir: Path) -> dict[str, list[float]]:
    """Per tensor, the standard deviation of the trainable weights at the end of each DKM
    epoch, from the ``dkm_weights/<name>`` histograms (one per epoch, in order)."""
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["histograms"]:
        if tag.startswith("dkm_weights/"):
            stds = []
            for event in sorted(acc.Histograms(tag), key=lambda e: e.step):
                h = event.histogram_value
                mean = h.sum / h.num
                stds.append(max(h.sum_squares / h.num - mean * mean, 0.0) ** 0.5)
            out[tag.removeprefix("dkm_weights/")] = stds
    return out


def per_layer(scalars: dict[str, list[tuple[int, float]]], metric: str) -> dict[str, list]:
    prefix = f"dkm/{metric}/"
    return {tag[len(prefix) :]: v for tag, v in scalars.items() if tag.startswith(prefix)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="a version_N directory (default: newest)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures/training_curves.png")
    args = parser.parse_args(argv)
    logdir = args.logdir or newest_run(DEFAULT_RUNS)
    scalars = load(logdir)
    missing = [t for t in ("dkm/tau", "dkm/entropy", "val_acc") if t not in scalars]
    if missing:
        raise SystemExit(f"{logdir} has no scalars {missing}")

    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    (ax_tau, ax_ent), (ax_acc, ax_ppl), (ax_rmse, ax_dead) = axes

    def plot(ax, series, label, **kwargs):
        xs, ys = zip(*series, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=label, **kwargs)

    num_epochs = len(scalars["val_acc"])
    taus = tau_by_step(logdir, num_epochs)
    plot(ax_tau, taus, "dkm/tau (geometric mean over tensors)", color="black")
    ax_tau.set_yscale("log")
    ax_tau.set_title("dkm/tau (units of the weight variance), per logged step", fontsize=9)

    plot(ax_ent, scalars["dkm/entropy"], "model (dkm/entropy)", color="black", lw=2)
    for name, series in per_layer(scalars, "entropy").items():
        plot(ax_ent, series, name)
    ax_ent.set_yscale("log")
    ax_ent.set_ylim(bottom=1e-9)  # below that it is float rounding
    ax_ent.set_title("soft-assignment entropy, bits per weight (axis from 1e-9)", fontsize=9)

    plot(ax_acc, scalars["val_acc"], "val_acc (weights snapped)", color="black")
    ax_acc.set_title("val_acc", fontsize=9)

    panels = (
        (ax_ppl, "perplexity", "perplexity: centroids in use (of 2**bits)"),
        (ax_dead, "dead_clusters", "dead_clusters: centroids no weight snaps to"),
    )
    for ax, metric, title in panels:
        for name, series in per_layer(scalars, metric).items():
            plot(ax, series, name)
        ax.set_title(title, fontsize=9)
    # snap_rmse in units of the tensor's weight std (from the weight histograms) when logged.
    stds = weight_std(logdir)
    relative = {}
    for name, series in per_layer(scalars, "snap_rmse").items():
        std = stds.get(name, [])
        if len(std) == len(series):
            relative[name] = [(e, v / s) for (e, v), s in zip(series, std, strict=True)]
        plot(ax_rmse, relative.get(name, series), name)
    unit = "weight std" if relative else "weight units"
    ax_rmse.set_title(f"snap_rmse: distance to the nearest centroid ({unit})", fontsize=9)
    dead = [v for series in per_layer(scalars, "dead_clusters").values() for _, v in series]
    ax_dead.set_ylim(-0.5, max(dead, default=0) + 1.5)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (of the DKM fit)")
    fig.suptitle(f"digits main job, {logdir.name}", fontsize=10)
    fig.text(
        0.01, 0.005, f"made by: bash scripts/dev.sh main && {COMMAND}", fontsize=7, color="0.4"
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)

    layer_tags = (t for t in scalars if re.match(r"dkm/(perplexity|snap_rmse|dead_clusters)/", t))
    columns = ["dkm/entropy", "val_acc", *sorted(layer_tags)]
    print(f"run: {logdir}")
    epochs = [e for e, _ in scalars["val_acc"]]
    first_tau = {int(x): v for x, v in reversed(taus)}  # the first logged tau of each epoch
    print(f"{'dkm/tau (first logged step)':38s}"
          + "".join(f"{first_tau.get(e, float('nan')):>11.4g}" for e in epochs))
    for tag in columns:
        values = dict(scalars[tag])
        print(f"{tag:38s}" + "".join(f"{values.get(e, float('nan')):>11.4g}" for e in epochs))
    for name, series in relative.items():
        print(f"{'snap_rmse / weight std ' + name:38s}" + "".join(f"{v:>11.4g}" for _, v in series))
    for name, std in stds.items():
        print(f"{'weight std ' + name:38s}" + "".join(f"{v:>11.4g}" for v in std))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
