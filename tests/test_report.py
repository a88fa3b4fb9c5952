"""Specification of the compression report: stored bytes, ratios, MACs and the energy estimate.

The reference model is one ``Linear(64, 64)`` (4096 weights, clustered) with its bias, followed
by a ``BatchNorm1d(64)`` (weight, bias, running mean/var: 4 x 64 floats, plus an int64
``num_batches_tracked``). Every expected number below is worked out by hand.
"""

from __future__ import annotations

import errno
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dkm import CompressionReport, EnergyModel, count_macs, palettize
from lightning_dkm.export.energy import (
    DRAM_READ_32BIT_PJ,
    FP16_MAC_PJ,
    FP32_MAC_PJ,
    SRAM_READ_32BIT_PJ,
)

UNCLUSTERED = 5 * 64 * 4 + 8  # bias + BN weight/bias/mean/var (fp32) + num_batches_tracked
UNCLUSTERED_FP16 = 5 * 64 * 2 + 8


def linear_bn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))


def clustered(**spec):
    model = linear_bn()
    return model, palettize(model, n_init=1, max_iter=20, **spec)


def test_bits_2_with_fp16_lut_counts_packed_indices_plus_one_lut() -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes)
    (layer,) = report.layers
    assert (layer.name, layer.shape, layer.bits, layer.palettes) == ("0.weight", (64, 64), 2, 1)
    assert layer.parameters == 4096
    assert layer.index_bytes == 4096 * 2 // 8 == 1024
    assert layer.lut_bytes == 4 * 2  # 2**2 centroids x fp16
    assert layer.compressed_bytes == 1032
    assert layer.fp32_bytes == 16384
    assert layer.ratio_vs_fp32 == pytest.approx(16384 / 1032)
    assert layer.bits_per_weight == pytest.approx(1032 * 8 / 4096)


def test_unclustered_parameters_and_buffers_count_at_their_dtype_width() -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes)
    by_name = {t.name: t for t in report.unclustered}
    assert sorted(by_name) == [
        "0.bias", "1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var",
        "1.weight",
    ]
    assert by_name["0.bias"].kind == "parameter" and by_name["0.bias"].bytes == 256
    assert by_name["1.running_var"].kind == "buffer"
    assert by_name["1.num_batches_tracked"].bytes == 8
    assert report.unclustered_bytes == UNCLUSTERED == 1288


def test_totals_and_ratios_against_fp32_and_fp16_baselines() -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes)
    assert report.total_bytes == 1032 + UNCLUSTERED == 2320
    # Floating tensors at 4 (2) bytes per element; the int64 counter at its own width.
    assert report.fp32_bytes == 4096 * 4 + 5 * 64 * 4 + 8 == 17672
    assert report.fp16_bytes == 4096 * 2 + UNCLUSTERED_FP16 == 8840
    assert report.ratio_vs_fp32 == pytest.approx(17672 / 2320)
    assert report.ratio_vs_fp16 == pytest.approx(8840 / 2320)
    totals = report.totals()
    assert totals["total_bytes"] == 2320 and totals["clustered_parameters"] == 4096


def test_fp32_lut_doubles_the_lut_bytes_only() -> None:
    model, palettes = clustered(bits=2)
    half = CompressionReport.build(model, palettes, lut_dtype=torch.float16)
    full = CompressionReport.build(model, palettes, lut_dtype=torch.float32)
    assert full.layers[0].lut_bytes == 4 * 4 == 2 * half.layers[0].lut_bytes
    assert full.layers[0].index_bytes == half.layers[0].index_bytes
    assert full.total_bytes - half.total_bytes == 8
    assert (half.lut_dtype, full.lut_dtype) == ("float16", "float32")


def test_grouped_palettes_count_one_lut_per_group() -> None:
    model, palettes = clustered(bits=2, group_size=16)
    layer = CompressionReport.build(model, palettes).layers[0]
    assert (layer.palettes, layer.group_size) == (4, 16)
    assert layer.lut_bytes == 4 * (4 * 2)  # P=4 LUTs of 4 fp16 centroids
    assert layer.index_bytes == 1024  # still one 2-bit index per weight


def test_cluster_dim_counts_one_index_per_vector() -> None:
    model, palettes = clustered(bits=4, cluster_dim=2)
    layer = CompressionReport.build(model, palettes).layers[0]
    assert layer.cluster_dim == 2
    assert layer.index_bytes == (4096 // 2) * 4 // 8 == 1024  # 2048 vectors x 4 bits
    assert layer.lut_bytes == 16 * 2 * 2  # 16 centroids x 2 entries x fp16
    assert layer.bits_per_weight == pytest.approx((1024 + 64) * 8 / 4096)


def test_odd_bit_widths_round_the_packed_indices_up_to_whole_bytes() -> None:
    model, palettes = clustered(bits=3)
    assert CompressionReport.build(model, palettes).layers[0].index_bytes == 4096 * 3 // 8
    model = nn.Sequential(nn.Linear(63, 33))  # 2079 weights x 3 bits = 6237 bits
    palettes = palettize(model, bits=3, min_size=0, n_init=1, max_iter=5)
    assert CompressionReport.build(model, palettes).layers[0].index_bytes == math.ceil(6237 / 8)


def test_tied_weights_are_counted_once() -> None:
    embed = nn.Embedding(64, 64)
    head = nn.Linear(64, 64, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    report = CompressionReport.build(model, {})
    assert [t.name for t in report.unclustered] == ["0.weight"]
    assert report.total_bytes == 64 * 64 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "shares its storage ... clustered once"
        palettes = palettize(model, bits=2, n_init=1, max_iter=5)
    report = CompressionReport.build(model, palettes)
    assert [layer.name for layer in report.layers] == ["0.weight"] and report.unclustered == []


def test_on_the_meta_device_only_tied_weights_are_one_tensor() -> None:
    from lightning_dkm.model.state import state_tensors

    with torch.device("meta"):  # every data pointer is 0 there
        embed, head, other = nn.Embedding(64, 64), nn.Linear(64, 64, bias=False), nn.Linear(
            64, 64, bias=False)
    head.weight = embed.weight
    state = state_tensors(nn.Sequential(embed, head, other))
    assert state.aliases == {"1.weight": "0.weight"}
    assert list(state.tensors) == ["0.weight", "2.weight"]


def test_optional_stats_fill_entropy_and_snap_rmse() -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(
        model, palettes, stats={"0.weight": {"entropy_bits": 0.25, "snap_rmse": 1e-3}}
    )
    assert (report.layers[0].entropy_bits, report.layers[0].snap_rmse) == (0.25, 1e-3)
    assert CompressionReport.build(model, palettes).layers[0].entropy_bits is None


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ({"nope.weight": {"snap_rmse": 0.1}}, "not a clustered tensor"),
        ({"0.weight": {"entropy": 0.1}},
         r"stats\['0.weight'\] has unknown keys \['entropy'\]; allowed: \('entropy_bits'"),
        ({"0.weight": 0.1}, r"stats\['0.weight'\] must be a mapping with keys from "
                            r"\('entropy_bits'.*; got 0.1"),
        ({"0.weight": {"snap_rmse": "x"}}, "must be numbers"),
    ],
)
def test_malformed_stats_are_rejected(stats, message) -> None:
    model, palettes = clustered(bits=2)
    with pytest.raises(ValueError, match=message):
        CompressionReport.build(model, palettes, stats=stats)


def test_bad_arguments_are_rejected() -> None:
    model, palettes = clustered(bits=2)
    with pytest.raises(ValueError, match="lut_dtype"):
        CompressionReport.build(model, palettes, lut_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not both"):
        CompressionReport.build(model, palettes, example_input=torch.randn(2, 64), macs={})
    with pytest.raises(ValueError, match="no tensor of that name"):
        CompressionReport.build(linear_bn(), {"fc.weight": palettes["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        CompressionReport.build(nn.Sequential(nn.Linear(32, 128)), palettes)


def test_json_round_trip_preserves_the_report() -> None:
    model, palettes = clustered(bits=2, group_size=16)
    report = CompressionReport.build(
        model, palettes, stats={"0.weight": {"entropy_bits": 0.5}},
        example_input=torch.randn(3, 64),
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["total_bytes"] == report.total_bytes
    assert data["layers"][0]["compressed_bytes"] == report.layers[0].compressed_bytes
    assert CompressionReport.from_dict(data) == report
    with pytest.raises(ValueError, match="format"):
        CompressionReport.from_dict({**data, "version": 99})


def test_table_and_markdown_have_a_row_per_layer_and_the_totals() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    palettes = palettize(model, bits=2, n_init=1, max_iter=5)
    report = CompressionReport.build(model, palettes)
    markdown = report.to_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert sum(line.startswith(("| 0.weight |", "| 2.weight |")) for line in rows) == 2
    assert f"{report.total_bytes:,} B" in markdown
    table = report.to_table()
    assert "0.weight" in table and "2.weight" in table and f"{report.fp32_bytes:,} B" in table
    assert "ESTIMATED" not in table  # no energy section without MACs


def test_save_writes_json_and_markdown(tmp_path) -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes)
    paths = report.save(tmp_path / "out")
    assert paths["json"].name == "compression_report.json"
    assert paths["markdown"].name == "compression_report.md"
    assert CompressionReport.from_dict(json.loads(paths["json"].read_text())) == report
    assert paths["markdown"].read_text() == report.to_markdown()


def full_report() -> CompressionReport:
    """Grouped palettes, statistics and an energy estimate: every field of a report is set."""
    model, palettes = clustered(bits=2, group_size=16)
    return CompressionReport.build(
        model, palettes, stats={"0.weight": {"entropy_bits": 0.5, "snap_rmse": 1e-3}},
        example_input=torch.randn(3, 64),
    )


def test_load_reads_back_an_equal_report_from_its_directory_or_its_json(tmp_path) -> None:
    report = full_report()
    paths = report.save(tmp_path / "out")
    for source in (tmp_path / "out", paths["json"], str(paths["json"])):
        loaded = CompressionReport.load(source)
        assert loaded == report
        assert loaded.to_table() == report.to_table()
        assert loaded.to_markdown() == report.to_markdown()


def test_a_nan_statistic_is_stored_as_unknown_so_the_report_round_trips(tmp_path) -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes, stats={"0.weight": {"snap_rmse": math.nan}})
    assert report.layers[0].snap_rmse is None
    report.save(tmp_path)
    assert "NaN" not in (tmp_path / "compression_report.json").read_text()  # standard JSON
    assert CompressionReport.load(tmp_path) == report


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "lightning_dkm.compression_report", "ver', "not valid JSON"),
        ('{"format": "other", "version": 1}', "format='other'"),
        ('{"format": "lightning_dkm.compression_report", "version": 1}',
         r"lacks the entries \['layers', 'unclustered', 'lut_dtype'\]"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_load_names_the_file_and_what_is_wrong(tmp_path, content, message) -> None:
    path = tmp_path / "compression_report.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        CompressionReport.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_load_of_a_directory_without_a_report_names_the_expected_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no compression report at .*report\.json"):
        CompressionReport.load(tmp_path)


def test_from_dict_names_a_missing_field_of_a_layer() -> None:
    data = json.loads(json.dumps(full_report().to_dict()))
    del data["layers"][0]["bits"]
    with pytest.raises(ValueError, match=r"LayerReport entry lacks the fields \['bits'\]"):
        CompressionReport.from_dict(data)


def test_a_report_save_failing_midway_keeps_both_previous_files_and_no_temp_file(
    tmp_path, monkeypatch
) -> None:
    old = full_report()
    old.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write_text = Path.write_text

    def half_then_fail(self, data, *args, **kwargs):  # the JSON is written, the markdown not
        if data.startswith("# Compression report"):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    new = CompressionReport.build(*clustered(bits=3))
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert CompressionReport.load(tmp_path) == old


def test_a_lut_beyond_float16_range_is_counted_at_4_bytes_and_noted() -> None:
    model = linear_bn()
    with torch.no_grad():
        model[0].weight.mul_(1e6)  # U(-1/8, 1/8) -> up to 1.25e5, beyond float16's 65504
    palettes = palettize(model, bits=2, n_init=1, max_iter=20)
    report = CompressionReport.build(model, palettes)  # lut_dtype float16
    (layer,) = report.layers
    assert (layer.lut_dtype, layer.lut_bytes) == ("float32", 4 * 4)  # 4 centroids x fp32
    assert report.total_bytes == 4 * 4 + 1024 + UNCLUSTERED
    note = ("LUT stored in float32, not float16 (values float16 cannot hold: beyond its range "
            "or below its normal range): 0.weight")
    assert note in report.to_table() and note in report.to_markdown()
    within = CompressionReport.build(*clustered(bits=2))
    assert within.layers[0].lut_dtype is None and "LUT stored in" not in within.to_table()


# -- MACs -------------------------------------------------------------------------------------


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, groups=2)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn(self.conv(x))  # (N, 8, 8, 8)
        x = self.grouped(x)  # (N, 16, 3, 3)
        x = self.up(x)  # (N, 4, 6, 6)
        return self.fc(x.flatten(1))


def test_count_macs_of_a_small_conv_net_by_hand() -> None:
    model = SmallConvNet()
    macs = count_macs(model, torch.randn(2, 3, 8, 8))
    assert macs == {
        "conv": 2 * 8 * 8 * 8 * (3 * 3 * 3),  # outputs x (in/groups x kernel)
        "grouped": 2 * 16 * 3 * 3 * (4 * 3 * 3),
        "up": 2 * 16 * 3 * 3 * (4 * 2 * 2),  # inputs x (out/groups x kernel)
        "fc": 2 * 10 * 144,  # outputs x in_features
    }


def test_count_macs_leaves_the_model_in_its_mode_and_its_statistics_untouched() -> None:
    model = SmallConvNet().train()
    before = model.bn.running_mean.clone()
    count_macs(model, torch.randn(2, 3, 8, 8))
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, before)


def test_count_macs_of_embedding_and_attention_projections() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, tokens):
            x = self.embed(tokens)
            return self.attn(x, x, x, need_weights=False)[0]

    macs = count_macs(Encoder(), (torch.randint(0, 100, (2, 5)),))
    tokens = 2 * 5
    # q, k, v in-projections under the attention module; the output projection under its own.
    assert macs == {"embed": 0, "attn": tokens * 16 * 16 * 3, "attn.out_proj": tokens * 16 * 16}


def test_count_macs_sees_inside_a_transformer_layer_in_eval_mode() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    macs = count_macs(layer, torch.randn(2, 5, 16))
    assert macs["self_attn"] + macs["self_attn.out_proj"] == 10 * 16 * 16 * 4
    assert macs["linear1"] == 10 * 16 * 32 and macs["linear2"] == 10 * 32 * 16


# -- energy estimate --------------------------------------------------------------------------


def test_energy_constants_are_horowitz_isscc_2014() -> None:
    assert (DRAM_READ_32BIT_PJ, SRAM_READ_32BIT_PJ) == (640.0, 5.0)
    assert math.isclose(FP32_MAC_PJ, 3.7 + 0.9)  # fmult + fadd, 32-bit
    assert math.isclose(FP16_MAC_PJ, 1.1 + 0.4)  # fmult + fadd, 16-bit
    with pytest.raises(ValueError, match="mac_pj"):
        EnergyModel(mac_pj=-1.0)


def test_energy_estimate_by_hand() -> None:
    model, palettes = clustered(bits=2)
    report = CompressionReport.build(model, palettes, example_input=torch.randn(1, 64))
    e = report.energy
    assert e is not None and e.macs == 64 * 64
    pj = 1e-6
    assert e.estimated_fetch_energy_fp32_uj == pytest.approx(17672 / 4 * 640 * pj)
    assert e.estimated_fetch_energy_compressed_uj == pytest.approx(2320 / 4 * 640 * pj)
    assert e.estimated_lut_lookup_energy_uj == pytest.approx(4096 * 5 * pj)  # 1 read/index
    assert e.estimated_compute_energy_uj == pytest.approx(4096 * 4.6 * pj)
    assert e.estimated_total_energy_compressed_uj == pytest.approx(
        (2320 / 4 * 640 + 4096 * 5 + 4096 * 4.6) * pj
    )
    assert e.estimated_energy_ratio > 1
    layer = report.layers[0]
    assert layer.macs == 4096
    assert layer.estimated_fetch_energy_compressed_uj == pytest.approx(
        (1032 / 4 * 640 + 4096 * 5) * pj
    )
    assert "ESTIMATED energy" in report.to_table()
    assert all(k.startswith("estimated_") for k in report.to_dict()["estimated_energy"]
               if k.endswith("_uj") or k.endswith("ratio"))


def test_vector_lookups_read_whole_32_bit_words() -> None:
    model, palettes = clustered(bits=4, cluster_dim=2)
    macs = {"0": 4096}
    half = CompressionReport.build(model, palettes, macs=macs).energy
    full = CompressionReport.build(model, palettes, macs=macs, lut_dtype=torch.float32).energy
    assert half.estimated_lut_lookup_energy_uj == pytest.approx(2048 * 1 * 5e-6)  # 2 x fp16
    assert full.estimated_lut_lookup_energy_uj == pytest.approx(2048 * 2 * 5e-6)  # 2 x fp32
