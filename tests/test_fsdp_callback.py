"""DKMCallback under FSDP2: Lightning's ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``fully_shard`` in ``configure_model``, on 2 CPU processes (gloo).

Each fit runs ``fsdp_fit_script.py`` (Lightning's launcher starts the second process). The
specification: every rank holds the same centroids, also when the ranks initialise their
weights differently (FSDP2 does not synchronise them); the artifact and the finalized plain
model equal a DDP run's with the same global batches; a resume from a sharded or a full FSDP
checkpoint ends where the uninterrupted run ends; the other methods work too. DKM runs
shard-locally (``lightning_dkm.engine.shard_local``): once per optimizer step, also under
gradient accumulation, where the fit equals DDP's with the same accumulation; weights that
cannot go shard-local are named in a warning and clustered from the gathered weight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import assert_identical_centroids

from lightning_dkm import load_compressed

SCRIPT = Path(__file__).with_name("fsdp_fit_script.py")
CLUSTERED = ("body.0.weight", "body.2.weight")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def fit(out_dir: Path, strategy: str, *options: str) -> dict:
    """Run one fit of the script; returns rank 0's ``result.pt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), strategy, *options], env=env,
        capture_output=True, text=True, timeout=300, cwd=out_dir,
    )
    assert result.returncode == 0, _failure(result.stderr)
    return torch.load(out_dir / "result.pt", weights_only=False)


def _failure(stderr: str) -> str:
    """What a failed fit said: every line naming an error or an abort (rank 0's may come
    long before the other rank's traceback), then the end of stderr."""
    marks = ("Error", "error:", "terminate", "Abort", "abort", "Signal", "signal")
    said = [line for line in stderr.splitlines() if any(m in line for m in marks)]
    return "\n".join(said[:40]) + "\n--- end of stderr ---\n" + stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("fsdp")
    done = {}
    for name, strategy, options in [
        ("fsdp", "fsdp", ["--checkpoints", "--tensorboard"]),
        ("ddp", "ddp", []),
        ("fsdp_full", "fsdp", ["--checkpoints", "--full"]),
    ]:
        done[name] = (root / name, fit(root / name, strategy, *options))
    for name, source, options in [
        ("resumed", "fsdp", []), ("resumed_full", "fsdp_full", ["--full"]),
    ]:
        checkpoint = done[source][0] / "ckpt" / "epoch=0-step=8.ckpt"
        done[name] = (root / name, fit(root / name, "fsdp", "--resume", str(checkpoint), *options))
    return done


def assert_same_fit(result: dict, expected: dict, exact: bool) -> None:
    """The palettes and the finalized model agree: bit for bit (``exact``), or within float32
    tolerance (``torch.testing``'s default), as when DDP's all-reduce and FSDP2's
    reduce-scatter average the gradients in different orders for 16 steps."""
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    assert result["palettes"].keys() == expected["palettes"].keys() == set(CLUSTERED)
    for name, weight in expected["palettes"].items():
        torch.testing.assert_close(result["palettes"][name], weight, **tolerance)
    assert result["finalized"].keys() == expected["finalized"].keys()
    for key, value in expected["finalized"].items():
        torch.testing.assert_close(result["finalized"][key], value, **tolerance)


def test_every_rank_holds_the_same_centroids(runs):
    for name in ("fsdp", "fsdp_full", "resumed", "resumed_full"):
        assert_identical_centroids(runs[name][0])


def test_the_artifact_and_the_finalized_model_equal_a_ddp_run_with_the_same_global_batch(runs):
    (_, fsdp), (_, ddp) = runs["fsdp"], runs["ddp"]
    assert_same_fit(fsdp, ddp, exact=False)
    assert fsdp["report_bytes"] == ddp["report_bytes"]
    from fsdp_fit_script import ShardedMLP

    sharded = load_compressed(ShardedMLP(), fsdp["artifact"])
    plain = load_compressed(ShardedMLP(), ddp["artifact"])
    for name in CLUSTERED:
        assert torch.equal(sharded[name].indices.long(), plain[name].indices.long()), name
        torch.testing.assert_close(sharded[name].lut, plain[name].lut)


def test_the_finalized_model_is_the_plain_module_with_snapped_weights(runs):
    state = runs["fsdp"][1]["finalized"]
    assert not any("parametrizations" in key for key in state)
    for name in CLUSTERED:
        assert torch.unique(state[name]).numel() <= 4, name


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_a_resume_from_an_fsdp_checkpoint_ends_where_the_uninterrupted_run_ends(runs, kind):
    straight, resumed = ("fsdp", "resumed") if kind == "sharded" else ("fsdp_full", "resumed_full")
    checkpoint = runs[straight][0] / "ckpt" / "epoch=0-step=8.ckpt"
    assert checkpoint.is_dir() == (kind == "sharded")
    assert_same_fit(runs[resumed][1], runs[straight][1], exact=True)


@pytest.mark.parametrize("method", ["hard", "deep_kmeans"])
def test_the_other_methods_run_with_the_same_centroids_on_ranks_that_initialise_differently(
    tmp_path, method
):
    result = fit(tmp_path, "fsdp", "--method", method, "--rank-seeds")
    assert_identical_centroids(tmp_path)  # seeded from the gathered weights, not at setup
    assert Path(result["artifact"]).is_file()
    for name in CLUSTERED:
        assert torch.unique(result["palettes"][name]).numel() <= 4, name


def test_a_full_fsdp_checkpoint_loads_into_a_plain_model_snapped(runs):
    from fsdp_fit_script import ShardedMLP

    from lightning_dkm.model.snapping import snap_state_dict

    checkpoint = torch.load(runs["fsdp_full"][0] / "ckpt" / "epoch=0-step=8.ckpt",
                            weights_only=True)
    state = checkpoint["state_dict"]
    assert any("parametrizations" in key for key in state)  # the model's own (DKM) keys
    model = ShardedMLP()
    assert sorted(snap_state_dict(model, state)) == list(CLUSTERED)
    model.load_state_dict(state)
    for name in CLUSTERED:
        assert torch.unique(model.get_submodule(name[:-7]).weight).numel() <= 4, name


def test_metrics_and_histograms_of_the_sharded_weights_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (runs["fsdp"][0] / "lightning_logs").glob("version_0/events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"histograms": 0})
    events.Reload()
    for name in CLUSTERED:  # each gathered from both ranks' shards
        assert f"dkm_weights/{name}" in events.Tags()["histograms"], name
    assert "dkm/entropy" in events.Tags()["scalars"]


def test_without_accumulation_the_centroids_move_once_in_every_batch_and_nothing_warns(runs):
    result = runs["fsdp"][1]
    assert result["moved"] == [True] * 16  # 2 epochs of 8 batches
    assert not [w for w in result["warnings"] if "gathered" in w]


def test_under_gradient_accumulation_dkm_runs_once_per_optimizer_step_and_equals_ddp(tmp_path):
    fsdp = fit(tmp_path / "fsdp", "fsdp", "--accumulate", "2")
    ddp = fit(tmp_path / "ddp", "ddp", "--accumulate", "2")
    assert fsdp["moved"] == ddp["moved"] == [True, False] * 8  # at each window's first batch
    assert_identical_centroids(tmp_path / "fsdp")
    assert_same_fit(fsdp, ddp, exact=False)


def test_weights_that_cannot_go_shard_local_are_named_in_a_warning_and_still_train(tmp_path):
    result = fit(tmp_path, "fsdp", "--implementation", "chunked")
    (warning,) = [w for w in result["warnings"] if "gathered" in w]
    assert all(name in warning for name in CLUSTERED) and "'chunked'" in warning
    assert_identical_centroids(tmp_path)
    for name in CLUSTERED:
        assert torch.unique(result["palettes"][name]).numel() <= 4, name


def test_the_default_budget_gives_uniform_widths_under_fsdp2_with_a_warning_naming_it(tmp_path):
    result = fit(tmp_path, "fsdp", "--average-bits", "bits")
    (warning,) = [w for w in result["warnings"] if "average_bits" in w]
    assert "DKMCallback(average_bits='bits' (bits=2))" in warning
    assert "under FSDP2" in warning and "average_bits=None" in warning
    allocation = result["bit_allocation"]
    assert allocation["sensitivity"].startswith("uniform (under FSDP2")
    assert {row["bits"] for row in allocation["tensors"]} == {2}
    assert_identical_centroids(tmp_path)
    for name in CLUSTERED:
        assert torch.unique(result["palettes"][name]).numel() <= 4, name
