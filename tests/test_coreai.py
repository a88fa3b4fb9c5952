"""Specification of the Core AI export: every clustered tensor becomes one LUT op holding our
palette exactly (read back from the package), the package runs in coreai-core's runtime (on
Linux) and computes what PyTorch computes, widths Core AI cannot pack are refused before anything
is written, and a fit checks the conversion before training and loses nothing when an export
fails at the end."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from extras import need
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, trainer
from plain_models import EveryLayer, every_layer_inputs

from lightning_dkm import DKMCallback, load_compressed, palettize
from lightning_dkm.export import coreai
from lightning_dkm.export.coreai import (
    export_coreai,
    lut_op_names,
    read_coreai_palettes,
    run_coreai,
)
from lightning_dkm.model.carried import carried_palettes

need("coreai_torch")


Net = EveryLayer


def examples() -> tuple[torch.Tensor, torch.Tensor]:
    return every_layer_inputs(2)


#: One tensor per supported width, with every layout: grouped, per-channel scale, vectors.
LAYOUTS = {
    "embed": {"bits": 4, "cluster_dim": 2},
    "conv1": {"bits": 2, "per_channel_scale": True, "group_size": 4},
    "conv": {"bits": 6},
    "deconv": {"bits": 1, "per_channel_scale": True},
    "fc": {"bits": 8, "group_size": 8},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    palettize(model, min_size=256, n_init=1, max_iter=10, overrides=LAYOUTS)
    path = tmp_path_factory.mktemp("coreai") / "net.aimodel"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_coreai(model, path, examples())
    return model, result


def test_every_clustered_tensor_is_one_lut_op_holding_its_palette_exactly(exported) -> None:
    model, result = exported
    palettes = carried_palettes(model)
    ops = read_coreai_palettes(result.path)
    names = lut_op_names(result.path)
    assert sorted(names) == sorted(palettes) and len(ops) == len(palettes) == result.lut_ops
    for op, name in zip(ops, names, strict=True):
        palette = palettes[name]
        assert op.bits == palette.layout.spec.bits
        assert op.axis == palette.layout.vector_axis
        np.testing.assert_array_equal(op.indices, palette.index_grid().numpy())
        np.testing.assert_array_equal(op.lut.reshape(palette.lut.shape), palette.lut.numpy())
        assert (op.scale is None) == (palette.scale is None)
        if op.scale is not None:
            np.testing.assert_array_equal(op.scale.reshape(-1), palette.scale.numpy())
        np.testing.assert_array_equal(op.weight(), model.get_parameter(name).detach().numpy())


def test_the_package_runs_in_coreai_core_and_matches_pytorch(exported) -> None:
    model, result = exported
    assert result.max_abs_difference <= result.tolerance
    inputs = examples()
    (out,) = run_coreai(result.path, inputs)
    with torch.no_grad():
        expected = model.eval()(*inputs).numpy()
    assert np.abs(out - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_the_package_is_smaller_than_the_dense_weights(exported) -> None:
    model, result = exported
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert 0 < result.package_bytes < dense


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_a_width_core_ai_cannot_pack_is_refused_before_anything_is_written(tmp_path, bits) -> None:
    model = Net()
    palettize(model, min_size=256, n_init=1, max_iter=5, overrides={"fc": {"bits": bits}})
    path = tmp_path / "net.aimodel"
    with pytest.raises(ValueError, match=rf"fc\.weight \({bits} bits\).*\[1, 2, 4, 6, 8\]"):
        export_coreai(model, path, examples())
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_runtime_that_computes_something_else_is_an_error(tmp_path, monkeypatch) -> None:
    """No real export computes something else, so ``run_coreai`` (public) is wrapped to offset its
    outputs: the check compares the runtime's outputs with PyTorch's."""
    model = Net()
    palettize(model, bits=2, min_size=256, n_init=1, max_iter=5)
    real = coreai.run_coreai
    monkeypatch.setattr(coreai, "run_coreai",
                        lambda path, inputs: [o + 1e-2 for o in real(path, inputs)])
    with pytest.raises(ValueError, match="differ from PyTorch's by up to"):
        export_coreai(model, tmp_path / "net.aimodel", examples())


def test_a_lightning_module_outside_a_trainer_exports_and_stays_as_it_was(tmp_path) -> None:
    model = TinyNet()
    palettize(model, bits=2)
    weights = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in weights.items()}
    model.train()
    result = export_coreai(model, tmp_path / "tiny.aimodel", torch.randn(3, 32))
    assert result.lut_ops == 2 and result.max_abs_difference <= result.tolerance
    assert model.training and "_jit_is_scripting" not in vars(model)
    assert {n: p for n, p in model.named_parameters()} == weights  # the same Parameter objects
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name])
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # noqa: B018  (the flag is gone again)


def test_a_compiled_model_exports_as_its_module(tmp_path) -> None:
    model = TinyNet()
    palettize(model, bits=4)
    result = export_coreai(torch.compile(model), tmp_path / "c.aimodel", torch.randn(3, 32))
    assert sorted(lut_op_names(result.path)) == ["body.0.weight", "body.2.weight"]


def test_a_loaded_artifact_exports_the_same_lut_ops(tmp_path) -> None:
    from lightning_dkm import save_compressed

    model = TinyNet()
    palettize(model, bits=2)
    save_compressed(model, tmp_path / "m.dkm.safetensors", lut_dtype="float32")
    loaded = TinyNet()
    load_compressed(loaded, tmp_path / "m.dkm.safetensors")
    first = export_coreai(model, tmp_path / "a.aimodel", torch.randn(2, 32))
    second = export_coreai(loaded, tmp_path / "b.aimodel", torch.randn(2, 32))
    for a, b in zip(read_coreai_palettes(first.path), read_coreai_palettes(second.path),
                    strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.lut, b.lut)


# -- the callback ----------------------------------------------------------------------------
class Erfcx(TinyNet):
    """An op neither converter has (``torch.special.erfcx``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfcx(self.body(x))


class CountsSteps(TinyNet):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def fit(tmp_path, model, **callback_args):
    model.example_input_array = torch.randn(2, 32)
    cb = DKMCallback(save_dir=str(tmp_path / "dkm"), **callback_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model)
    return cb


def test_the_callback_writes_a_verified_aimodel_and_records_it_in_the_report(tmp_path) -> None:
    cb = fit(tmp_path, TinyNet(), bits=2, export_coreai=True)
    path = cb.output_paths["coreai"]
    assert path.name == "model.aimodel" and path.is_dir()
    assert len(read_coreai_palettes(path)) == 2
    entry = json.loads(cb.output_paths["json"].read_text())["exports"]["coreai"]
    assert entry["path"] == str(path) and entry["lut_ops"] == 2
    assert 0 <= entry["max_abs_difference"] <= entry["tolerance"]
    assert "coreai: " in cb.output_paths["markdown"].read_text()


@pytest.mark.parametrize("export", ["export_coreai", "export_coreml"])
def test_a_model_that_cannot_convert_fails_before_the_first_training_step(tmp_path, export
                                                                          ) -> None:
    class Broken(Erfcx, CountsSteps):
        pass

    Broken.steps = 0
    with pytest.raises(MisconfigurationException,
                       match=rf"{export}=True\): Broken cannot be converted.*before training"):
        fit(tmp_path, Broken(), bits=2, **{export: True})
    assert Broken.steps == 0


def test_a_width_core_ai_cannot_pack_fails_at_setup(tmp_path) -> None:
    CountsSteps.steps = 0
    with pytest.raises(MisconfigurationException, match=r"body\.2\.weight \(3 bits\)"):
        fit(tmp_path, CountsSteps(), bits=2, overrides={"body.2": {"bits": 3}},
            export_coreai=True)
    assert CountsSteps.steps == 0


@pytest.mark.parametrize("example, problem", [
    (None, "TinyNet has none: set self.example_input_array"),
    ({"x": torch.zeros(1, 32)}, r"sequence of tensors \(the model's positional inputs\); got dict"),
    ((torch.zeros(1, 32), 3), r"example_input_array\[1\] must be a tensor; got int"),
])
def test_an_export_without_a_usable_example_input_fails_at_setup(
        tmp_path, example, problem) -> None:
    model = TinyNet()
    model.example_input_array = example
    cb = DKMCallback(save_dir=str(tmp_path / "dkm"), export_coreai=True)
    with pytest.raises(MisconfigurationException,
                       match=r"DKMCallback\(export_coreai=True\) converts the model on its "
                             rf"example_input_array: .*{problem}"):
        trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model)


def test_an_export_failing_at_fit_end_loses_nothing_and_says_how_to_retry(
        tmp_path, monkeypatch, caplog) -> None:
    """No model both passes the setup-time trial conversion and fails at fit end, so
    ``export_coreai`` (public) is replaced by one that raises."""
    def broken(*args, **kwargs):
        raise ValueError("the runtime is away")

    monkeypatch.setattr(coreai, "export_coreai", broken)
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError, match="failed after training") as info:
        fit(tmp_path, TinyNet(), bits=2, export_coreai=True)
    artifact = tmp_path / "dkm" / "model.dkm.safetensors"
    message = str(info.value)
    assert f"safe at {artifact}" in message and "export_coreai(load_compressed(" in message
    assert artifact.is_file() and (tmp_path / "dkm" / "compression_report.json").is_file()
    assert "totals" in caplog.text  # the report was printed before the export
    monkeypatch.undo()
    model = TinyNet()
    load_compressed(model, artifact)  # the retry the message names works
    assert export_coreai(model, tmp_path / "dkm" / "model.aimodel",
                         torch.randn(2, 32)).lut_ops == 2


# -- the command line --------------------------------------------------------------------------
def test_the_cli_lists_the_lut_ops_by_tensor_name(exported, capsys) -> None:
    from lightning_dkm.command import main

    _, result = exported
    assert main(["coreai", str(result.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes"] == result.package_bytes
    by_name = {op["op"]: op for op in data["ops"]}
    assert sorted(by_name) == sorted(f"{name}.weight" for name in LAYOUTS)
    assert {name: by_name[f"{name}.weight"]["bits"] for name in LAYOUTS} == {
        name: spec["bits"] for name, spec in LAYOUTS.items()}
    assert by_name["embed.weight"]["cluster_dim"] == 2
    assert by_name["conv1.weight"]["per_channel_scale"]
    assert by_name["conv1.weight"]["lut_blocks"] == 4  # 16 channels in groups of 4
    assert main(["coreai", str(result.path)]) == 0
    assert "conv.weight: indices (16, 4, 3, 3), 6 bits" in capsys.readouterr().out


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing.aimodel",
                                  lambda tmp: (tmp / "x.aimodel").mkdir() or tmp / "x.aimodel"],
                         ids=["missing", "not-a-package"])
def test_the_cli_says_what_is_wrong_with_a_bad_path_in_one_line(tmp_path, capsys, make) -> None:
    from lightning_dkm.command import main

    assert main(["coreai", str(make(tmp_path))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-dkm: error: ")
