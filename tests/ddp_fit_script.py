"""Fit TinyNet with DKMCallback under ``strategy="ddp"`` on 2 CPU processes (gloo).

Run as ``python ddp_fit_script.py OUT_DIR [tensorboard]``: Lightning's launcher re-runs this
script for rank 1. The callback writes to its *default* save_dir (the trainer's log_dir + /dkm),
which every rank must resolve together. Buffers are not broadcast, so each rank's centroids are
what that rank computed itself; each rank saves them before finalize (``centroids_rank{r}.pt``).
Rank 0 also saves the finalized state dict and where the outputs went (``final_state.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_helpers import CentroidRecorder, TinyNet, trainer

from lightning_dkm import DKMCallback


def main(out_dir: str, logger: str = "none") -> None:
    torch.manual_seed(0)
    model = TinyNet()
    callback = DKMCallback(bits=2)
    t = trainer(
        Path(out_dir), strategy=DDPStrategy(broadcast_buffers=False), accelerator="cpu",
        devices=2, max_epochs=2,
        logger=TensorBoardLogger(out_dir) if logger == "tensorboard" else False,
        callbacks=[callback, CentroidRecorder(out_dir)],
    )
    t.fit(model)
    if t.global_rank == 0:
        torch.save(
            {"state_dict": model.state_dict(), "artifact": str(callback.artifact_path)},
            Path(out_dir) / "final_state.pt",
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
