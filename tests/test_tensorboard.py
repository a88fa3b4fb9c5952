"""What DKMCallback writes to TensorBoard, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinyNet, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dkm import DKMCallback


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> EventAccumulator:
    root = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(str(root), name="run")
    callback = DKMCallback(
        bits=2, temperature={"schedule": "exponential", "start": 1.0, "end": 1e-4}
    )
    trainer(root, logger=logger, max_epochs=5, log_every_n_steps=1, callbacks=[callback]).fit(
        TinyNet()
    )
    event_file = next(Path(logger.log_dir).glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(event_file), size_guidance={"histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def test_tau_and_entropy_scalars_are_logged_every_epoch(events):
    tags = events.Tags()["scalars"]
    assert {"dkm/tau", "dkm/entropy"} <= set(tags)
    assert len(scalar(events, "dkm/tau")) == 5
    assert len(scalar(events, "dkm/entropy")) == 5


def test_per_layer_metrics_are_logged(events):
    tags = set(events.Tags()["scalars"])
    for layer in ("body.0.weight", "body.2.weight"):
        for metric in ("entropy", "perplexity", "dead_clusters", "snap_rmse", "usage_entropy"):
            assert f"dkm/{metric}/{layer}" in tags


def test_entropy_falls_as_tau_anneals(events):
    entropy = scalar(events, "dkm/entropy")
    tau = scalar(events, "dkm/tau")
    assert tau == sorted(tau, reverse=True)
    assert entropy[-1] < entropy[0]
    assert entropy[-1] < 0.1  # bits: assignments have hardened


def test_centroid_and_weight_histograms_are_written(events):
    tags = set(events.Tags()["histograms"])
    assert "dkm_centroids/body.0.weight" in tags
    assert "dkm_weights/body.2.weight" in tags
