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
    callback = DKMCallback(bits=2)  # the default temperature: calibrated, annealed per step
    trainer(root, logger=logger, max_epochs=5, log_every_n_steps=1, callbacks=[callback]).fit(
        TinyNet()
    )
    event_file = next(Path(logger.log_dir).glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(event_file), size_guidance={"histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def test_tau_is_logged_every_step_and_entropy_every_epoch(events):
    tags = events.Tags()["scalars"]
    assert {"dkm/tau", "dkm/entropy"} <= set(tags)
    assert [e.step for e in events.Scalars("dkm/tau")] == list(range(20))  # 5 epochs x 4 steps
    assert len(scalar(events, "dkm/entropy")) == 5


def test_per_layer_metrics_are_logged(events):
    tags = set(events.Tags()["scalars"])
    for layer in ("body.0.weight", "body.2.weight"):
        for metric in ("entropy", "perplexity", "dead_clusters", "snap_rmse", "usage_entropy"):
            assert f"dkm/{metric}/{layer}" in tags


def test_entropy_falls_as_tau_anneals(events):
    entropy = scalar(events, "dkm/entropy")
    tau = scalar(events, "dkm/tau")
    assert tau == sorted(tau, reverse=True) and tau[-1] < tau[0] / 10
    assert entropy[0] > 0.01  # bits: still soft after the first epoch
    assert entropy[-1] < entropy[0] / 10
    assert entropy[-1] < 0.01  # bits: assignments have hardened


def test_centroid_and_weight_histograms_are_written(events):
    tags = set(events.Tags()["histograms"])
    assert "dkm_centroids/body.0.weight" in tags
    assert "dkm_weights/body.2.weight" in tags


def test_the_compression_report_is_logged_at_fit_end(events):
    tags = set(events.Tags()["scalars"])
    assert {"dkm_report/total_bytes", "dkm_report/ratio_vs_fp32",
            "dkm_report/bits_per_clustered_weight"} <= tags
    ratio = scalar(events, "dkm_report/ratio_vs_fp32")
    assert len(ratio) == 1 and ratio[0] > 4
    bits = scalar(events, "dkm_report/bits_per_clustered_weight")[0]
    assert 2.0 <= bits < 2.1  # 2-bit indices plus the LUTs
    text = events.Tensors("dkm_report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "# Compression report" in text
    assert "Energy estimate: skipped" in text  # TinyNet has no example_input_array


class CountsTauLogs(TinyNet):
    """Counts the ``self.log`` calls of ``dkm/tau``."""

    def __init__(self) -> None:
        super().__init__()
        self.tau_logs = 0

    def log(self, name, value, *args, **kwargs):
        self.tau_logs += name == "dkm/tau"
        super().log(name, value, *args, **kwargs)


def test_tau_reaches_every_step_the_logger_writes_without_a_log_call_on_the_others(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    model = CountsTauLogs()
    # 5 epochs x 4 steps; the logger writes every third step (steps 2, 5, 8, ...)
    t = trainer(tmp_path, logger=logger, max_epochs=5, log_every_n_steps=3,
                callbacks=[DKMCallback(bits=2, finalize=False)])
    t.fit(model)
    event_file = next(Path(logger.log_dir).glob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_file))
    events.Reload()
    written = [e.step for e in events.Scalars("train_loss")]
    assert written == list(range(2, 20, 3))
    assert [e.step for e in events.Scalars("dkm/tau")] == written
    # logged at those steps and each epoch's first and last batch, not at every step
    steps = set(written) | {4 * e for e in range(5)} | {4 * e + 3 for e in range(5)}
    assert model.tau_logs == len(steps) < 20
