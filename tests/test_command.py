"""Specification of the ``lightning-dkm`` console script: the report of an artifact from the
file alone, the LUT ops of a Core ML package, and the exit codes a CLI user expects."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from extras import need
from torch import nn

import lightning_dkm
from lightning_dkm import CompressionReport, command, palettize, save_compressed
from lightning_dkm.command import Argument, Subcommand, main


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
    need("coremltools")
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


def console_script() -> list[str]:
    script = shutil.which("lightning-dkm", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "lightning_dkm.command"]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lightning-dkm {lightning_dkm.__version__}\n"
    assert lightning_dkm.__version__ == "0.1.0"


def _not_an_artifact(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    return path


def _fake_package(tmp_path: Path) -> Path:
    package = tmp_path / "fake.mlpackage"
    package.mkdir()
    (package / "junk").write_text("x")
    return package


@pytest.mark.parametrize(
    ("command_line", "reason"),
    [
        (lambda tmp, art: ["inspect", str(tmp / "missing.safetensors")], "no such file"),
        (lambda tmp, art: ["inspect", str(tmp)], "is a directory"),
        (lambda tmp, art: ["inspect", str(_not_an_artifact(tmp))], "plain.safetensors"),
        (lambda tmp, art: ["inspect", str(_fake_package(tmp))], "fake.mlpackage"),
        (lambda tmp, art: ["coreml", str(tmp / "missing.mlpackage")],
         "no such file or directory: .*missing.mlpackage"),
        (lambda tmp, art: ["coreml", str(_fake_package(tmp))],
         "fake.mlpackage: not a readable Core ML package"),
        (lambda tmp, art: ["coreml", str(art)],
         "model.dkm.safetensors: not a readable Core ML package"),
    ],
    ids=["inspect-missing", "inspect-directory", "inspect-not-an-artifact",
         "inspect-a-package", "coreml-missing", "coreml-not-a-package", "coreml-an-artifact"],
)
def test_every_failure_is_one_error_line_on_stderr_and_exit_1(
    artifact, tmp_path, capsys, command_line, reason
):
    args = command_line(tmp_path, artifact[0])
    if args[0] == "coreml" and "missing" not in args[1]:
        need("coremltools")
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]  # coremltools may warn on import before it
    assert re.match(rf"lightning-dkm: error: .*{reason}", last), captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("fc.weight"), OSError()],
                         ids=["runtime-error", "key-error", "no-message"])
def test_an_unexpected_error_is_still_one_line_and_exit_1(artifact, capsys, monkeypatch, error):
    """No valid file makes the reader raise an arbitrary error, so ``inspect_artifact`` (public) is
    replaced by one that does."""
    def fail(path):
        raise error

    monkeypatch.setattr("lightning_dkm.export.artifact.inspect_artifact", fail)
    assert main(["inspect", str(artifact[0])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-dkm: error: ")
    assert err.strip().removeprefix("lightning-dkm: error: ") in ("boom", "'fc.weight'", "OSError")


def test_a_reader_that_closes_the_pipe_early_is_not_an_error(artifact):
    """``lightning-dkm inspect --json FILE | head -1``: no BrokenPipeError traceback, exit 0."""
    read, write = os.pipe()
    process = subprocess.Popen([*console_script(), "inspect", "--json", str(artifact[0])],
                               stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)  # the reader is gone before the first byte: every write fails (EPIPE)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_subcommand_is_a_function_and_one_registration(artifact, capsys, monkeypatch):
    """``SUBCOMMANDS`` is the documented registration point for a subcommand; the test adds one."""
    def count(args) -> str:
        return f"{len(lightning_dkm.read_palettes(args.file))} palettes"

    echo = Subcommand("count", "how many palettes an artifact holds",
                      (Argument(("file",), {"help": "an artifact"}),), count)
    monkeypatch.setattr(command, "SUBCOMMANDS", (*command.SUBCOMMANDS, echo))
    assert main(["count", str(artifact[0])]) == 0
    assert capsys.readouterr().out == "2 palettes\n"
