"""DKMCallback configured from a LightningCLI YAML file."""

from __future__ import annotations

import textwrap

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import TinyNet

from lightning_dkm import DKMCallback

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
          init_args: {{start: 1.0e-1, end: 1.0e-3, num_units: 8}}
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
    assert callback.temperature.schedule == ExponentialSchedule(start=0.1, end=1e-3, num_units=8)
    if method == "hard":
        assert isinstance(callback.method, HardMethod)
    else:
        assert isinstance(callback.method, DeepKMeansMethod)
        assert (callback.method.regularization, callback.method.refresh_every) == (1e-2, 2)
    cli.trainer.fit(cli.model)  # trains with them
    assert callback.state_dict()["method"] == callback.method.name


# -- what --print_config writes runs again ------------------------------------------------------
ROUND_TRIP = TRAINER + """        finalize: false
        overrides: {{body.2: {{bits: 3, group_size: 32}}}}
        temperature: {temperature}
        method: {method}
        lut_dtype: float32
"""
SCHEDULE = ("{class_path: lightning_dkm.lightning.schedules.ExponentialSchedule, "
            "init_args: {start: 1.0e-1, end: 1.0e-3, num_units: 8}}")
DEEP_KMEANS = ("{class_path: lightning_dkm.model.methods.DeepKMeansMethod, "
               "init_args: {regularization: 1.0e-2, refresh_every: 2}}")

def print_config(config, capsys) -> str:
    """What ``fit --config config --print_config`` prints (and LightningCLI saves as
    config.yaml: the same dump)."""
    with pytest.raises(SystemExit) as exit_:
        LightningCLI(TinyNet, args=["fit", "--config", str(config), "--print_config"],
                     save_config_callback=None)
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("temperature", "method"),
    [
        pytest.param("{schedule: exponential, start: auto, end: auto}", "dkm"),
        pytest.param("{schedule: step, start: 1.0e-2, step_size: 1, gamma: 0.5, "
                     "interval: epoch}", "dkm"),
        ("1.0e-2", "hard"),
        ("auto", DEEP_KMEANS),
        pytest.param("lightning_helpers.tau_of_unit", "dkm"),
        pytest.param("{schedule: lightning_helpers.tau_of_unit, interval: epoch}", "dkm"),
        (SCHEDULE, "dkm"),
        pytest.param(f"{{schedule: {SCHEDULE}, interval: epoch}}", "dkm"),
    ],
    ids=["auto-mapping", "step-mapping", "number", "method-object", "import-path",
         "mapping-with-import-path", "schedule-object", "mapping-with-schedule-object"],
)
def test_print_config_writes_a_config_that_runs_again(tmp_path, capsys, temperature, method):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(ROUND_TRIP.format(
        root=tmp_path, temperature=temperature, method=method)))
    printed = print_config(config, capsys)
    assert "Unable to serialize" not in printed
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert print_config(again, capsys) == printed  # a fixed point
    first = LightningCLI(TinyNet, args=["--config", str(config)], run=False,
                         save_config_callback=None).trainer.callbacks[0]
    cli = LightningCLI(TinyNet, args=["fit", "--config", str(again)], save_config_callback=None)
    callback = cli.trainer.callbacks[0]
    assert callback.temperature.to_dict() == first.temperature.to_dict()
    assert callback.method.name == first.method.name
    assert callback.overrides == first.overrides and callback.lut_dtype == "float32"
    assert cli.trainer.current_epoch == 2  # it trained


def test_the_config_yaml_lightning_cli_saves_runs_again(tmp_path):
    given = tmp_path / "given.yaml"
    given.write_text(textwrap.dedent(CONFIG.format(root=tmp_path)).replace(
        "{schedule: exponential, start: 1.0e-2, end: 1.0e-4}",
        "{schedule: exponential, start: auto, end: auto}"))
    LightningCLI(TinyNet, args=["fit", "--config", str(given)])
    saved = tmp_path / "config.yaml"  # the trainer's log_dir: default_root_dir without a logger
    text = saved.read_text()
    assert "Unable to serialize" not in text and "start: auto" in text
    cli = LightningCLI(TinyNet, args=["fit", "--config", str(saved)],
                       save_config_callback=None)
    assert cli.trainer.callbacks[0].temperature.calibrates


def test_the_example_config_in_configuration_md_runs(tmp_path):
    """docs/configuration.md's example (every argument at its default) is a config that runs."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    example = page.split("## Example: LightningCLI config")[1].split("```yaml\n")[1]
    config = tmp_path / "config.yaml"
    config.write_text(example.split("```")[0])
    cli = LightningCLI(TinyNet, args=["--config", str(config), "--trainer.logger=false",
                                      f"--trainer.default_root_dir={tmp_path}"],
                       run=False, save_config_callback=None)
    callback = cli.trainer.callbacks[0]
    assert callback.temperature == DKMCallback().temperature
    assert callback.spec == DKMCallback().spec
