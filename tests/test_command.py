"""Specification of the ``lightning-dkm`` console script: the report of an artifact from the
file alone, the LUT ops of a Core ML package, and the exit codes a CLI user expects."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dkm import CompressionReport, palettize, save_compressed
from lightning_dkm.command import main


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 64)
        self.bn = nn.BatchNorm1d(64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.embed(tokens).mean(1)))


@pytest.fixture
def artifact(tmp_path) -> tuple[Path, CompressionReport]:
    model = Net()
    palettes = palettize(model, bits=2, min_size=256, overrides={"fc": {"group_size": 16}})
    path = save_compressed(model, tmp_path / "model.dkm.safetensors")
    return path, CompressionReport.build(model, palettes)


def test_inspect_prints_the_report_rows_and_totals_from_the_file_alone(artifact, capsys):
    path, report = artifact
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "embed.weight" in out and "fc.weight" in out
    assert f"{report.total_bytes:,} B" in out
    assert "fp32 model" in out


def test_inspect_json_is_the_report_the_training_run_would_write(artifact, capsys):
    path, report = artifact
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == report.to_dict()["totals"]
    assert [layer["name"] for layer in data["layers"]] == ["embed.weight", "fc.weight"]
    kinds = {t["name"]: t["kind"] for t in data["unclustered"]}
    assert kinds["fc.bias"] == "parameter" and kinds["bn.running_mean"] == "buffer"


def test_a_missing_or_corrupt_file_exits_1_with_the_reason_on_stderr(artifact, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "lightning-dkm: error: no such file" in capsys.readouterr().err
    path, _ = artifact
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    assert main(["inspect", str(broken)]) == 1
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["inspect"])
    assert err.value.code == 2


def test_the_console_script_is_installed_and_runs(artifact):
    path, _ = artifact
    script = shutil.which("lightning-dkm", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "lightning_dkm.command"]
    result = subprocess.run([*command, "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fc.weight" in result.stdout


def test_coreml_lists_the_lut_ops_of_a_package(tmp_path, capsys):
    pytest.importorskip("coremltools")
    import warnings

    from lightning_dkm.export.coreml import export_coreml

    model = Net().eval()
    palettize(model, bits=2, min_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = export_coreml(model, tmp_path / "net.mlpackage", torch.randint(0, 64, (2, 5)))
    assert main(["coreml", str(package), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {op["bits"] for op in data["ops"]} == {2} and len(data["ops"]) == 2
    assert main(["coreml", str(tmp_path / "missing.mlpackage")]) == 1
