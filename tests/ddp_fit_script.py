"""Fit TinyNet with DKMCallback under ``strategy="ddp"`` on 2 CPU processes (gloo).

Run as ``python ddp_fit_script.py OUT_DIR``: Lightning's launcher re-runs this script for rank 1.
Each rank saves its centroids before finalize (``centroids_rank{r}.pt``); rank 0 also saves the
finalized state dict (``final_state.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_helpers import CentroidRecorder, TinyNet, trainer

from lightning_dkm import DKMCallback


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    t = trainer(
        Path(out_dir), strategy="ddp", accelerator="cpu", devices=2, max_epochs=2,
        callbacks=[DKMCallback(bits=2, save_dir=str(Path(out_dir) / "dkm")),
                   CentroidRecorder(out_dir)],
    )
    t.fit(model)
    if t.global_rank == 0:
        torch.save(model.state_dict(), Path(out_dir) / "final_state.pt")


if __name__ == "__main__":
    main(sys.argv[1])
