"""DKMCallback configured from a LightningCLI YAML file."""

from __future__ import annotations

import textwrap

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import TinyNet

#: The trainer and the callback line every config below starts with.
TRAINER = """
seed_everything: 0
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_dkm.DKMCallback
      init_args:
        bits: 2
"""

CONFIG = TRAINER + """        targets: ["body.*"]
        exclude: ["body.4"]
        min_size: 1024
        overrides:
          body.2: {{bits: 3, group_size: 32}}
        temperature: {{schedule: exponential, start: 1.0e-2, end: 1.0e-4}}
        save_dir: {root}/dkm
"""

OPTIMIZER_BLOCK = """
optimizer:
  class_path: torch.optim.Adam
  init_args:
    lr: 0.01
"""


def run_cli(tmp_path, extra: str = "") -> LightningCLI:
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(CONFIG.format(root=tmp_path)) + extra)
    return LightningCLI(TinyNet, args=["fit", "--config", str(config)], save_config_callback=None)


def original_weights(model: TinyNet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "optimizer_block", ["", OPTIMIZER_BLOCK], ids=["module-optimizer", "yaml-optimizer"]
)
def test_yaml_config_trains_clusters_and_finalizes(tmp_path, optimizer_block):
    cli = run_cli(tmp_path, optimizer_block)
    model, callback = cli.model, cli.trainer.callbacks[0]
    assert type(callback).__name__ == "DKMCallback"
    assert torch.unique(model.body[0].weight).numel() <= 4
    grouped = model.body[2].weight.reshape(2, 32 * 64)  # group_size 32 -> 2 palettes of 8 values
    assert all(torch.unique(row).numel() <= 8 for row in grouped)
    assert callback.palettes["body.2.weight"].layout.num_palettes == 2
    assert (tmp_path / "dkm" / "model.dkm.safetensors").is_file()


def test_optimizer_built_by_the_cli_before_fit_trains_the_clustered_weights(tmp_path):
    """LightningCLI builds the optimizer from model.parameters() before fit; the
    parametrizations keep each Parameter's identity, so those weights still train."""
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(CONFIG.format(root=tmp_path)) + OPTIMIZER_BLOCK)
    cli = LightningCLI(TinyNet, args=["--config", str(config)], run=False,
                       save_config_callback=None)
    before = original_weights(cli.model)
    optimizer_params = {id(p) for p in cli.model.parameters()}
    cli.trainer.fit(cli.model)
    after = original_weights(cli.model)
    assert {id(p) for p in cli.model.parameters()} == optimizer_params
    for name in ("body.0.weight", "body.2.weight", "body.4.weight", "body.0.bias"):
        assert not torch.equal(before[name], after[name]), name


OBJECTS = TRAINER + """        finalize: false
        temperature:
          class_path: lightning_dkm.lightning.schedules.ExponentialSchedule
          init_args: {{start: 1.0e-1, end: 1.0e-3, num_epochs: 8}}
        method: {method}
"""


@pytest.mark.parametrize(
    "method",
    ["hard", "{class_path: lightning_dkm.model.methods.DeepKMeansMethod, "
             "init_args: {regularization: 1.0e-2, refresh_every: 2}}"],
    ids=["name", "class_path"],
)
def test_yaml_gives_temperature_and_method_as_objects(tmp_path, method):
    from lightning_dkm.lightning.schedules import ExponentialSchedule
    from lightning_dkm.model.methods import DeepKMeansMethod, HardMethod

    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(OBJECTS.format(root=tmp_path, method=method)))
    cli = LightningCLI(TinyNet, args=["--config", str(config)], run=False,
                       save_config_callback=None)
    callback = cli.trainer.callbacks[0]
    assert callback.temperature.fn == ExponentialSchedule(start=0.1, end=1e-3, num_epochs=8)
    if method == "hard":
        assert isinstance(callback._method, HardMethod)
    else:
        assert isinstance(callback._method, DeepKMeansMethod)
        assert (callback._method.regularization, callback._method.refresh_every) == (1e-2, 2)
    cli.trainer.fit(cli.model)  # trains with them
