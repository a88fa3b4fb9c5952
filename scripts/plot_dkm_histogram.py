"""Plot one layer's weight histogram with its centroids, before and after DKM fine-tuning.

    python scripts/plot_dkm_histogram.py              # writes docs/figures/dkm_histogram.png

The digits CNN (examples/digits.py) is trained briefly in fp32 with a plain PyTorch loop, then
fine-tuned with the DKM engine (``select_targets`` -> ``attach`` -> train -> ``finalize``) at
2 bits per weight, as in examples/digits_dkm.yaml (every tensor with >= 2048 weights; the
classifier ``net.11`` at 4 bits). The top panel shows the layer's fp32 weights with the k-means++
centroids DKM starts from (what post-training palettization would ship); the bottom panel the
trainable weights after DKM fine-tuning with the final centroids. The test accuracies of the
fp32 model, of the k-means palettized model and of the DKM-finalized model are printed and put
in the figure title, with the fp32 model trained for the same number of extra epochs as a
baseline. Takes 1-2 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsCNN, DigitsDataModule  # noqa: E402

from lightning_dkm import ClusterSpec, attach, finalize, select_targets  # noqa: E402
from lightning_dkm.lightning.convergence import measure  # noqa: E402
from lightning_dkm.lightning.schedules import build_schedule  # noqa: E402
from lightning_dkm.model.attach import clustered_tensors, set_mode, set_temperature  # noqa: E402

COMMAND = "python scripts/plot_dkm_histogram.py"


def train_epoch(model, loader, optimizer) -> float:
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return total / count


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()  # DKM parametrizations snap to the nearest centroid in eval mode
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / sum(len(y) for _, y in loader)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures/dkm_histogram.png")
    parser.add_argument("--layer", default="net.5.weight", help="the tensor to plot")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--dkm-epochs", type=int, default=3)
    parser.add_argument("--tau-start", type=float, default=1e-2)
    parser.add_argument("--tau-end", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    data = DigitsDataModule(batch_size=64, seed=args.seed)
    data.setup()
    train, test = data.train_dataloader(), data.test_dataloader()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.pretrain_epochs):
        train_epoch(model, train, optimizer)
    fp32_acc = accuracy(model, test)
    # Baseline with the same training budget: the fp32 model trained for the DKM epochs too.
    baseline = copy.deepcopy(model)
    torch.manual_seed(args.seed + 1)  # the same batch order as the DKM epochs below
    baseline_opt = torch.optim.Adam(baseline.parameters(), lr=1e-3)
    for _ in range(args.dkm_epochs):
        train_epoch(baseline, train, baseline_opt)
    fp32_longer_acc = accuracy(baseline, test)
    print(f"fp32 training: {time.perf_counter() - started:.1f} s", flush=True)

    # The engine, as DKMCallback uses it: select, attach (k-means++ seeding), train, finalize.
    targets = select_targets(model, ClusterSpec(bits=args.bits), overrides={"net.11": {"bits": 4}})
    if args.layer not in [t.name for t in targets]:
        raise SystemExit(f"{args.layer} is not clustered; clustered: {[t.name for t in targets]}")
    attach(model, targets, temperature=args.tau_start)
    tensor = clustered_tensors(model)[args.layer]
    before_w = tensor.original.detach().flatten().clone()
    before_c = tensor.parametrization.centroids.detach().flatten().clone()
    kmeans_acc = accuracy(model, test)  # eval mode: weights snapped to the k-means centroids
    initial_entropy = measure(tensor)["entropy"]

    schedule = build_schedule(
        "exponential", start=args.tau_start, end=args.tau_end, num_units=args.dkm_epochs
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # same Parameters, fresh state
    set_mode(model, "soft")
    torch.manual_seed(args.seed + 1)
    for epoch in range(args.dkm_epochs):
        set_temperature(model, schedule(epoch))
        train_epoch(model, train, optimizer)
    print(f"DKM fine-tuning done at {time.perf_counter() - started:.1f} s", flush=True)
    stats = measure(tensor)
    after_w = tensor.original.detach().flatten().clone()
    after_c = tensor.parametrization.centroids.detach().flatten().clone()
    finalize(model)
    dkm_acc = accuracy(model, test)
    distinct = torch.unique(dict(model.named_parameters())[args.layer]).numel()
    moved = float((after_w - before_w).pow(2).mean().sqrt() / before_w.std())

    results = {
        "fp32_test_acc": fp32_acc,
        "fp32_longer_test_acc": fp32_longer_acc,
        "kmeans_test_acc": kmeans_acc,
        "dkm_test_acc": dkm_acc,
        "initial_entropy_bits": initial_entropy,
        "final_entropy_bits": stats["entropy"],
        "final_snap_rmse": stats["snap_rmse"],
        "weight_rms_change_in_std": moved,
        "distinct_values_after_finalize": distinct,
        "layer_std": float(before_w.std()),
        "seconds": time.perf_counter() - started,
    }
    print("centroids before:", [round(c, 4) for c in before_c.tolist()])
    print("centroids after: ", [round(c, 4) for c in after_c.tolist()])

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    lo = float(min(before_w.min(), after_w.min()))
    hi = float(max(before_w.max(), after_w.max()))
    bins = torch.linspace(lo, hi, 201).tolist()
    panels = [
        (
            axes[0],
            before_w,
            before_c,
            f"after {args.pretrain_epochs} fp32 epochs, with the "
            f"k-means++ centroids DKM starts from (snapped: test acc {kmeans_acc:.3f})",
        ),
        (
            axes[1],
            after_w,
            after_c,
            f"after {args.dkm_epochs} DKM epochs, tau "
            f"{args.tau_start:g} -> {args.tau_end:g} (finalized: test acc {dkm_acc:.3f})",
        ),
    ]
    for ax, weights, centroids, title in panels:
        ax.hist(weights.numpy(), bins=bins, color="0.55")
        for i, c in enumerate(centroids.tolist()):
            ax.axvline(c, color="tab:red", lw=1.2, label="centroids" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel("weights per bin")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel(f"{args.layer} value ({before_w.numel():,} weights, {args.bits} bits)")
    fig.suptitle(
        f"digits CNN {args.layer}: fp32 test acc {fp32_acc:.3f} after {args.pretrain_epochs} "
        f"epochs, {fp32_longer_acc:.3f} after {args.pretrain_epochs + args.dkm_epochs}",
        fontsize=10,
    )
    fig.text(0.01, 0.005, f"made by: {COMMAND}", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)

    for key, value in results.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
