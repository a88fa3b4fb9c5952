"""CUDA smoke tests: DKMCallback on TinyNet for one epoch on a GPU, under mixed and half
precision, with every implementation; the clustering metrics update on the device; DDP on two
GPUs where there are two. Skipped where CUDA is absent; ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import CentroidRecorder, TinyNet, trainer

from lightning_dkm import ClusterSpec, DKMCallback, attach, clustered_tensors, select_targets
from lightning_dkm.lightning.convergence import measure_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IMPLEMENTATIONS = ["auto", "reference", "chunked", "unique"]
PRECISIONS = ["16-mixed", "bf16-mixed", "bf16-true"]


def clustered_weights(model: TinyNet) -> list[torch.Tensor]:
    return [model.body[0].weight, model.body[2].weight]


class DeviceRecorder(pl.Callback):
    """Records, after every training batch, the devices of the clustered weights' originals
    and centroids: Lightning's teardown moves the module back to the CPU after the fit, so
    where the clustering ran can only be seen during it. (Reading the parametrized weight
    itself would run an extra DKM step and move the centroids.)"""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.names: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, tensor in clustered_tensors(pl_module).items():
            self.names.add(name)
            self.devices.add(tensor.original.device.type)
            self.devices.add(tensor.parametrization.centroids.device.type)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_epoch_on_cuda_logs_the_metrics_and_finalizes(tmp_path, precision, implementation):
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = TinyNet()
    callback = DKMCallback(bits=2, implementation=implementation,
                           save_dir=str(tmp_path / "dkm"), verbose=False)
    devices = DeviceRecorder()
    fit = trainer(tmp_path, accelerator="cuda", devices=1, precision=precision, max_epochs=1,
                  callbacks=[callback, devices])
    fit.fit(model)
    assert devices.names == {"body.0.weight", "body.2.weight"}
    assert devices.devices == {"cuda"}
    assert math.isfinite(float(fit.callback_metrics["dkm/entropy"]))
    assert set(callback.stats) == {"body.0.weight", "body.2.weight"}
    for stats in callback.stats.values():
        assert all(math.isfinite(value) for value in stats.values()), stats
    for weight in clustered_weights(model):
        assert torch.unique(weight).numel() <= 4


def test_the_metrics_are_measured_on_the_weights_device() -> None:
    model = TinyNet().cuda()
    tensors = attach(model, select_targets(model, ClusterSpec(bits=2)))
    per_tensor, entropy = measure_all(tensors)
    assert math.isfinite(entropy)
    assert all(0 <= stats["dead_clusters"] <= 4 for stats in per_tensor.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs 2 GPUs")
def test_ddp_on_two_gpus_gives_identical_centroids_and_finalizes(tmp_path) -> None:
    model = TinyNet()
    fit = trainer(tmp_path, accelerator="cuda", devices=2, precision="bf16-mixed", max_epochs=1,
                  strategy=DDPStrategy(start_method="spawn", broadcast_buffers=False),
                  callbacks=[DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"), verbose=False),
                             CentroidRecorder(str(tmp_path))])
    fit.fit(model)
    rank0 = torch.load(tmp_path / "centroids_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "centroids_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == {"body.0.weight", "body.2.weight"}
    for name in rank0:
        assert torch.equal(rank0[name].cpu(), rank1[name].cpu()), name
    for weight in clustered_weights(model):
        assert torch.unique(weight).numel() <= 4
