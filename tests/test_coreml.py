"""Specification of the Core ML export: every clustered tensor becomes one LUT op holding our
palette (read back from the saved package, without macOS), for every layout and layer type, at
about the size the report gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from extras import need
from plain_models import EveryLayer, every_layer_inputs
from torch import nn

from lightning_dkm import CompressionReport, DKMCallback, palettize
from lightning_dkm.export.coreml import export_coreml, package_bytes, read_coreml_palettes

ct = need("coremltools")


Net = EveryLayer


def examples() -> tuple[torch.Tensor, torch.Tensor]:
    return every_layer_inputs(1)


def every_layout(model: nn.Module):
    return palettize(
        model, bits=2, min_size=256, n_init=1, max_iter=10,
        overrides={"conv": {"cluster_dim": 2}, "fc": {"group_size": 8, "bits": 3},
                   "deconv": {"per_channel_scale": True, "group_size": 4},
                   "conv1": {"per_channel_scale": True}},
    )


def op_for(ops, name: str):
    stem = name.replace(".", "_") + "_"
    matches = [op for op_name, op in ops.items() if op_name.startswith(stem)]
    assert len(matches) == 1, (name, list(ops))
    return matches[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    palettes = every_layout(model)
    path = tmp_path_factory.mktemp("coreml") / "net.mlpackage"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_coreml(model, path, examples())
    return model, palettes, path


def test_every_clustered_tensor_is_one_lut_op_with_our_indices(exported) -> None:
    _, palettes, path = exported
    ops = read_coreml_palettes(path)
    assert len(ops) == len(palettes) == 5
    for name, palette in palettes.items():
        op = op_for(ops, name)
        assert np.array_equal(op.indices, palette.index_grid().numpy()), name
        assert op.lut.shape[-2:] == (palette.layout.spec.num_centroids,
                                     palette.layout.spec.cluster_dim), name


def test_the_luts_are_ours_in_float16_and_rebuild_our_weights(exported) -> None:
    _, palettes, path = exported
    ops = read_coreml_palettes(path)
    for name, palette in palettes.items():
        op = op_for(ops, name)
        if palette.scale is None:
            ours = palette.lut.half().numpy().reshape(-1)
            assert np.array_equal(np.unique(op.lut.reshape(-1)), np.unique(ours)), name
            expected = type(palette)(palette.lut.half().float(), palette.indices,
                                     palette.layout).weight().numpy()
        else:
            assert np.array_equal(op.scale.reshape(-1), palette.scale.half().numpy()), name
            expected = type(palette)(palette.lut.half().float(), palette.indices,
                                     palette.layout, palette.scale.half().float()).weight().numpy()
        assert np.array_equal(op.weight(), expected), name  # exact, on the stored float16


def test_the_package_is_about_the_size_of_the_report(exported) -> None:
    model, palettes, path = exported
    report = CompressionReport.build(model, palettes)
    weights = sum(f.stat().st_size for f in path.rglob("weight.bin"))
    dense_fp16 = sum(t.numel * 2 for t in report.unclustered if t.floating)
    payload = report.clustered_bytes + dense_fp16  # Core ML stores the rest in float16
    blobs = 3 * len(palettes) + len(report.unclustered)
    assert payload <= weights <= payload + 128 * blobs + 64  # 64-byte aligned blob headers
    assert package_bytes(path) > weights


def test_a_model_without_palettes_exports_dense_with_a_warning(tmp_path) -> None:
    with pytest.warns(UserWarning, match="carries no palettes"):
        export_coreml(Net(), tmp_path / "dense.mlpackage", examples())
    assert read_coreml_palettes(tmp_path / "dense.mlpackage") == {}


def test_bad_arguments_are_refused_naming_them(tmp_path) -> None:
    model = Net()
    every_layout(model)
    with pytest.raises(ValueError, match=r"must end in \.mlpackage"):
        export_coreml(model, tmp_path / "net.mlmodel", examples())
    with pytest.raises(ValueError, match="convert_to must be 'mlprogram'"):
        export_coreml(model, tmp_path / "net.mlpackage", examples(), convert_to="neuralnetwork")
    with torch.no_grad():
        model.fc.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"fc\.weight: the weight no longer matches"):
        export_coreml(model, tmp_path / "net.mlpackage", examples())
    assert not (tmp_path / "net.mlpackage").exists()


def _state(model: nn.Module) -> dict[str, object]:
    """What the export must leave as it was: the state_dict keys, every buffer (by name, with
    its value) and the non-persistent buffer sets."""
    return {"keys": list(model.state_dict()),
            "buffers": {name: b.clone() for name, b in model.named_buffers()},
            "non_persistent": [sorted(m._non_persistent_buffers_set) for m in model.modules()]}


@pytest.mark.parametrize("converts", [True, False], ids=["converts", "conversion_fails"])
def test_the_model_leaves_the_export_as_it_came(tmp_path, monkeypatch, converts) -> None:
    """Palettes recorded on a submodule (``palettize(model.body)``) have no metadata version at
    the model's root, which ``ct.convert`` needs: it is there for the conversion only."""
    from lightning_dkm.export import coreml as coreml_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
    palettize(model[2], bits=2)
    before = _state(model)
    path = tmp_path / "part.mlpackage"
    if converts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_coreml(model, path, torch.randn(2, 32))
        assert len(read_coreml_palettes(path)) == 1  # the root's version was there to convert
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("the converter is away")

        monkeypatch.setattr(coreml_module, "convert_to_mlprogram", broken)
        with pytest.raises(RuntimeError, match="converter is away"):
            export_coreml(model, path, torch.randn(2, 32))
    after = _state(model)
    assert after["keys"] == before["keys"]
    assert after["non_persistent"] == before["non_persistent"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, buffer in before["buffers"].items():
        assert torch.equal(after["buffers"][name], buffer), name


def test_the_callback_writes_an_mlpackage_when_asked(tmp_path) -> None:
    from lightning_helpers import TinyNet, trainer

    model = TinyNet()
    model.example_input_array = torch.randn(2, 32)
    cb = DKMCallback(bits=2, save_dir=str(tmp_path / "dkm"), export_coreml=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model)
    path = cb.output_paths["coreml"]
    assert path.name == "model.mlpackage" and path.is_dir()
    assert len(read_coreml_palettes(path)) == 2


def test_a_lightning_module_outside_a_trainer_exports(tmp_path) -> None:
    from lightning_helpers import TinyNet

    model = TinyNet()
    palettize(model, bits=2)
    model.train()
    path = export_coreml(model, tmp_path / "tiny.mlpackage", torch.randn(2, 32))
    assert len(read_coreml_palettes(path)) == 2
    assert model.training and "_jit_is_scripting" not in vars(model)
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # noqa: B018  (the flag is gone again)
