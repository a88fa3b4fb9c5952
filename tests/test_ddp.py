"""DKMCallback under DDP on 2 CPU processes (gloo): every rank computes identical centroids
itself, fit ends on every rank with the callback's default output directory (whose resolution
is a collective), and the process that called fit ends with the finalized weights, the report,
the palettes and the artifact path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import CentroidRecorder, TinyNet, assert_identical_centroids, trainer
from torch import nn

from lightning_dkm import CompressionReport, DKMCallback, load_compressed

pytestmark = pytest.mark.slow
LOGGERS = ["none", "tensorboard"]


def expected_save_dir(root: Path, logger: str) -> Path:
    base = root / "lightning_logs" / "version_0" if logger == "tensorboard" else root
    return base / "dkm"


@pytest.mark.parametrize("logger", LOGGERS)
def test_ddp_spawn_with_the_default_save_dir_ends_with_rank_zeros_results(tmp_path, logger):
    torch.manual_seed(0)
    model = TinyNet()
    callback = DKMCallback(bits=2)
    t = trainer(
        tmp_path, strategy=DDPStrategy(start_method="spawn", broadcast_buffers=False),
        accelerator="cpu", devices=2, max_epochs=2,
        logger=TensorBoardLogger(str(tmp_path)) if logger == "tensorboard" else False,
        callbacks=[callback, CentroidRecorder(str(tmp_path))],
    )
    t.fit(model)
    assert_identical_centroids(tmp_path)
    assert type(model.body[0]) is nn.Linear and not hasattr(model.body[0], "parametrizations")
    assert torch.unique(model.body[0].weight).numel() <= 4
    # the launching process holds what rank 0 produced
    save_dir = expected_save_dir(tmp_path, logger)
    assert callback.artifact_path == save_dir / "model.dkm.safetensors"
    assert callback.artifact_path.is_file()
    assert callback.report == CompressionReport.load(save_dir / "compression_report.json")
    assert set(callback.palettes) == {"body.0.weight", "body.2.weight"}
    for name, palette in callback.palettes.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(palette.weight(), module.weight), name
    loaded = load_compressed(TinyNet(), callback.artifact_path)
    for name, palette in callback.palettes.items():
        assert torch.equal(loaded[name].indices.long(), palette.indices.long()), name


@pytest.mark.parametrize("logger", LOGGERS)
def test_ddp_with_the_default_save_dir_ends_on_every_rank(tmp_path, logger):
    script = Path(__file__).with_name("ddp_fit_script.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), logger], env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical_centroids(tmp_path)
    final = torch.load(tmp_path / "final_state.pt", weights_only=True)
    state = final["state_dict"]
    assert "body.0.weight" in state and not any("parametrizations" in k for k in state)
    assert torch.unique(state["body.0.weight"]).numel() <= 4
    assert Path(final["artifact"]) == expected_save_dir(tmp_path, logger) / "model.dkm.safetensors"
    assert Path(final["artifact"]).is_file()
