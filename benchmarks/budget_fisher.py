"""Why ``average_bits`` weighs errors by the Hessian diagonal, not the squared gradients (#24):
the accuracy study's MiniLM loss is distillation to the unclustered model itself, so at the
start it is 0 and its gradients, hence the diagonal Fisher information, are rounding noise,
while its curvature is not.

Prints the loss of the first 8 training batches of seed 0 and each clustered tensor's mean
Fisher information and mean Hessian diagonal (what ``DKMCallback(average_bits=...)`` reads
when DKM starts, on its ``SENSITIVITY_BATCHES``) on them.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/budget_fisher.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from accuracy_study import MiniLMConfig, _calibration_loss, _quiet, minilm_task

from lightning_dkm.engine.layout import ClusterSpec
from lightning_dkm.lightning.bit_widths import SENSITIVITY_BATCHES
from lightning_dkm.model.post_training import fisher_diagonal, hessian_diagonal
from lightning_dkm.model.targets import select_targets


def main() -> None:
    _quiet()
    cfg = MiniLMConfig()
    task = minilm_task(cfg, log=lambda message: None)
    model = task.fresh().eval()
    names = [t.name for t in select_targets(model, ClusterSpec(), targets=task.targets)]
    loader = task.calibration(0, 8, cfg.batch_size)
    with torch.no_grad():
        losses = [float(task.loss(model, batch)) for batch in loader]
    print(f"MiniLM loss on the first {len(losses)} training batches: "
          + ", ".join(f"{loss:.2e}" for loss in losses))
    fisher = fisher_diagonal(model, loader, _calibration_loss(task), names, num_batches=8)
    hessian = hessian_diagonal(model, loader, _calibration_loss(task), names,
                               num_batches=SENSITIVITY_BATCHES)
    for name, value in fisher.items():
        print(f"{name}: mean Fisher information {float(value.mean()):.3e} (8 batches), mean "
              f"Hessian diagonal {float(hessian[name].mean()):.3e} ({SENSITIVITY_BATCHES})")


if __name__ == "__main__":
    main()
