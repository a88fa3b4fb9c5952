"""DKMCallback under DDP on 2 CPU processes (gloo): every rank holds identical centroids and the
process that called fit ends with the finalized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import CentroidRecorder, TinyNet, trainer
from torch import nn

from lightning_dkm import DKMCallback

pytestmark = pytest.mark.slow


def assert_identical_centroids(out_dir: Path) -> None:
    rank0 = torch.load(out_dir / "centroids_rank0.pt", weights_only=True)
    rank1 = torch.load(out_dir / "centroids_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == {"body.0.weight", "body.2.weight"}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ddp_spawn_ranks_share_centroids_and_main_process_gets_finalized_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    t = trainer(
        tmp_path, strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2,
        callbacks=[DKMCallback(bits=2, save_dir=str(tmp_path / "dkm")),
                   CentroidRecorder(str(tmp_path))],
    )
    t.fit(model)
    assert_identical_centroids(tmp_path)
    assert type(model.body[0]) is nn.Linear and not hasattr(model.body[0], "parametrizations")
    assert torch.unique(model.body[0].weight).numel() <= 4
    assert torch.unique(model.body[2].weight).numel() <= 4
    assert (tmp_path / "dkm" / "model.dkm.safetensors").is_file()


def test_ddp_ranks_share_centroids_and_rank_zero_ends_finalized(tmp_path):
    script = Path(__file__).with_name("ddp_fit_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical_centroids(tmp_path)
    state = torch.load(tmp_path / "final_state.pt", weights_only=True)
    assert "body.0.weight" in state and not any("parametrizations" in k for k in state)
    assert torch.unique(state["body.0.weight"]).numel() <= 4
