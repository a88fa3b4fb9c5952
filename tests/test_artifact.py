"""Specification of the compressed artifact: bit packing, the safetensors file, and loading it
safely.

The reference model has a Linear with grouped palettes, a Conv2d clustered in 2-vectors, an
Embedding and a BatchNorm (left dense), finalized by ``palettize``.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Callable

import pytest
import torch
from export_helpers import artifact_digest
from plain_models import WithBatchNorm
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_dkm import (
    CompressionReport,
    Palette,
    load_compressed,
    pack_bits,
    palettize,
    read_metadata,
    read_palettes,
    save_compressed,
    unpack_bits,
)

# -- bit packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_unpack_round_trip_at_exact_width(bits: int, count: int, gen) -> None:
    indices = torch.randint(0, 1 << bits, (count,), generator=gen)
    packed = pack_bits(indices, bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((count * bits + 7) // 8,)
    assert torch.equal(unpack_bits(packed, bits, count), indices)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_handles_the_largest_index(bits: int) -> None:
    indices = torch.full((13,), (1 << bits) - 1, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(indices, bits), bits, 13), indices.long())


def test_bits_are_packed_least_significant_first() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00_11_10_01]
    # 4 = 0b100 straddles the byte boundary: its two low bits end byte 0, its high bit opens byte 1
    assert pack_bits(torch.tensor([7, 1, 4]), 3).tolist() == [0b00_001_111, 0b1]
    assert pack_bits(torch.tensor([[1, 0], [1, 1]]), 1).tolist() == [0b1101]  # row-major


@pytest.mark.parametrize(
    ("indices", "bits", "message"),
    [
        (torch.tensor([0, 1]), 0, "bits must be an int in 1..8"),
        (torch.tensor([0, 1]), 9, "bits must be an int in 1..8"),
        (torch.tensor([0, 1]), True, "bits must be an int in 1..8"),
        (torch.tensor([0.0, 1.0]), 2, "integer tensor"),
        (torch.tensor([0, 4]), 2, r"\[0, 4\)"),
        (torch.tensor([-1, 0]), 2, r"\[0, 4\)"),
    ],
)
def test_pack_rejects_what_does_not_fit(indices, bits, message) -> None:
    with pytest.raises(ValueError, match=message):
        pack_bits(indices, bits)


def test_unpack_requires_the_exact_byte_length_and_zero_padding() -> None:
    packed = pack_bits(torch.tensor([1, 2, 3]), 2)  # 6 bits in 1 byte
    with pytest.raises(ValueError, match="need exactly"):
        unpack_bits(packed, 2, 5)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_bits(packed | 0b1100_0000, 2, 3)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(packed.long(), 2, 3)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(packed, 2, -1)


# -- the reference model ----------------------------------------------------------------------


def finalized(model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Palette]]:
    model = model if model is not None else WithBatchNorm()
    model.bn.running_mean.uniform_()  # non-default buffers, so loading them is visible
    model.bn.num_batches_tracked.fill_(7)
    palettes = palettize(
        model, bits=3, min_size=256, n_init=1, max_iter=10,
        overrides={"conv": {"cluster_dim": 2}, "fc": {"group_size": 8}},
    )
    return model, palettes


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal weights and buffers; the carried-palette buffers (``_COREML_``, specified in
    test_carried.py) are left out: a dense load carries none."""
    a, b = ({k: v for k, v in d.items() if "_COREML_" not in k} for d in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reference_model_covers_every_layout_feature() -> None:
    _, palettes = finalized()
    assert palettes["fc.weight"].layout.num_palettes == 4
    assert palettes["conv.weight"].layout.spec.cluster_dim == 2
    assert "embed.weight" in palettes and "bn.weight" not in palettes


# -- round trips ------------------------------------------------------------------------------


def test_fp32_lut_loads_bit_for_bit_into_a_fresh_instance(tmp_path) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=torch.float32)
    fresh = WithBatchNorm()
    loaded = load_compressed(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert loaded.keys() == palettes.keys()
    for name, palette in loaded.items():
        assert torch.equal(palette.indices, palettes[name].indices)
        assert torch.equal(palette.weight(), fresh.state_dict()[name])


def test_fp16_lut_loads_the_fp16_rounded_centroids(tmp_path) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)  # fp16 by default
    fresh = WithBatchNorm()
    load_compressed(fresh, path)
    loaded = fresh.state_dict()
    for name, palette in palettes.items():
        rounded = Palette(palette.lut.half().float(), palette.indices, palette.layout).weight()
        assert torch.equal(loaded[name], rounded), name
    for name, value in model.state_dict().items():
        if name not in palettes and "_COREML_" not in name:  # carried LUTs: fp16-rounded too
            assert torch.equal(loaded[name], value), name


def test_tied_weights_are_stored_once_and_loaded_into_both_names(tmp_path) -> None:
    def tied() -> nn.Sequential:
        embed, head = nn.Embedding(64, 64), nn.Linear(64, 64, bias=False)
        head.weight = embed.weight
        return nn.Sequential(embed, head)

    model = tied()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "shares its storage ... clustered once"
        palettes = palettize(model, bits=2, n_init=1, max_iter=5)
    path = save_compressed(model, tmp_path / "t.safetensors", palettes, lut_dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["indices/0.weight", "lut/0.weight"]
    fresh = tied()
    load_compressed(fresh, path)
    assert torch.equal(fresh[1].weight, model[0].weight)
    assert fresh[0].weight is fresh[1].weight


@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.float32])
def test_size_on_disk_matches_the_report(tmp_path, lut_dtype) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=lut_dtype)
    report = CompressionReport.build(model, palettes, lut_dtype=lut_dtype)
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0] + 8
    data = os.path.getsize(path) - header_len
    assert report.total_bytes * 0.99 <= data <= report.total_bytes * 1.01
    assert data == report.total_bytes  # in fact exact: no padding between tensors


#: Every spelling of each LUT dtype that a ``lut_dtype`` argument takes (engine/palette.py).
LUT_DTYPE_SPELLINGS = {
    torch.float16: ["float16", "fp16", "half", torch.float16, torch.half],
    torch.float32: ["float32", "fp32", "float", torch.float32, torch.float],
}


@pytest.mark.parametrize(
    ("dtype", "spelling"),
    [(dtype, s) for dtype, spellings in LUT_DTYPE_SPELLINGS.items() for s in spellings],
    ids=str,
)
def test_every_lut_dtype_spelling_saves_and_reports_that_dtype(tmp_path, dtype, spelling):
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=spelling)
    name = str(dtype).removeprefix("torch.")
    assert json.loads(read_metadata(path)["lightning_dkm.layout"])["lut_dtype"] == name
    assert read_palettes(path)["fc.weight"].lut.dtype == dtype
    report = CompressionReport.build(model, palettes, lut_dtype=spelling)
    assert report.lut_dtype == name
    same = CompressionReport.build(model, palettes, lut_dtype=dtype)
    assert report.total_bytes == same.total_bytes
    palette = palettes["fc.weight"]
    assert palette.compressed_bytes(spelling) == palette.compressed_bytes(dtype)
    assert palette.stored_lut_dtype(spelling) == dtype


@pytest.mark.parametrize("bad", ["bfloat16", torch.bfloat16, "float64", "FP16", 16, None])
def test_a_bad_lut_dtype_is_refused_naming_the_value_and_what_is_allowed(tmp_path, bad):
    model, palettes = finalized()
    message = (r"lut_dtype must be torch\.float16 or torch\.float32, or one of the names "
               r"'float16', 'float32', 'fp16', 'half', 'fp32', 'float'; got "
               + re.escape(repr(bad)))
    with pytest.raises(ValueError, match=message):
        save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=bad)
    with pytest.raises(ValueError, match=message):
        CompressionReport.build(model, palettes, lut_dtype=bad)
    if bad is not None:  # a Palette's byte counts take None for its own dtype
        with pytest.raises(ValueError, match=message):
            palettes["fc.weight"].lut_bytes(bad)
    assert not (tmp_path / "m.safetensors").exists()


def _functions_with_a_lut_dtype() -> set[str]:
    """Every public function and method of the package's API that has a ``lut_dtype``
    argument, and DKMCallback; the records' fields of that name (``CompressionReport``,
    ``LayerReport``: the name a report holds) are not arguments."""
    import dataclasses
    import inspect

    import lightning_dkm

    found = set()
    for name in [*lightning_dkm.__all__, "DKMCallback"]:
        obj = getattr(lightning_dkm, name)
        members = [(name, obj)]
        if inspect.isclass(obj):
            members = [(name, obj)] if not dataclasses.is_dataclass(obj) else []
            members += [(f"{name}.{attr}", getattr(obj, attr)) for attr in vars(obj)
                        if not attr.startswith("_") and callable(getattr(obj, attr))]
        for label, member in members:
            try:
                parameters = inspect.signature(member).parameters
            except (TypeError, ValueError):
                continue
            if "lut_dtype" in parameters:
                found.add(label)
    return found


def test_the_lut_dtype_spellings_test_covers_every_function_with_a_lut_dtype():
    """A new public function with a ``lut_dtype`` must read it with ``lut_dtype_of`` and be
    added to the spellings test above (and DKMCallback's, in test_arguments.py)."""
    assert _functions_with_a_lut_dtype() == {
        "save_compressed", "CompressionReport.build", "DKMCallback",
        "Palette.stored_lut_dtype", "Palette.lut_bytes", "Palette.scale_bytes",
        "Palette.compressed_bytes",
    }


def test_the_file_is_plain_safetensors_without_pickle(tmp_path) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, metadata={"run": "a1"})
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert header["indices/fc.weight"]["dtype"] == "U8"
    assert header["lut/conv.weight"]["shape"] == [1, 8, 2]
    assert header["state/bn.running_mean"]["dtype"] == "F32"
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # no pickle, no zip
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["lightning_dkm.format"] == "lightning_dkm.compressed"
    assert read_metadata(path)["run"] == "a1"
    layout = json.loads(read_metadata(path)["lightning_dkm.layout"])["clustered"]["conv.weight"]
    assert layout == {
        "shape": [16, 4, 3, 3], "dtype": "float32", "bits": 3, "cluster_dim": 2,
        "group_size": None, "group_axis": 0, "vector_axis": 1, "count": 288,
    }


# -- refusing to save what would not load back --------------------------------------------------


def test_save_rejects_bad_arguments(tmp_path) -> None:
    model, palettes = finalized()
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="lut_dtype"):
        save_compressed(model, path, palettes, lut_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="reserved"):
        save_compressed(model, path, palettes, metadata={"lightning_dkm.format": "x"})
    with pytest.raises(ValueError, match="str to str"):
        save_compressed(model, path, palettes, metadata={"epoch": 3})
    with pytest.raises(ValueError, match="mapping returned by finalize"):
        save_compressed(model, path, [palettes["fc.weight"]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no tensor of that name"):
        save_compressed(model, path, {"head.weight": palettes["fc.weight"]})
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # the palettes no longer describe the weight
    with pytest.raises(ValueError, match="no longer matches the palette"):
        save_compressed(model, path, palettes)
    assert not path.exists()


def test_empty_palettes_for_a_clustered_model_are_refused_naming_its_weights(tmp_path) -> None:
    model, _ = finalized()  # embed (2048 weights, 8 values) and fc (2048, 4 x 8 values)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="look clustered") as err:
        save_compressed(model, path, {})
    message = str(err.value)
    assert "embed.weight (8 distinct values)" in message and "fc.weight" in message
    assert "conv.weight" not in message  # 576 weights: below the size that is clustered
    assert "DKMCallback.palettes" in message and "allow_dense=True" in message
    assert not path.exists()


def test_allow_dense_stores_clustered_looking_weights_dense(tmp_path) -> None:
    model, _ = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", {}, allow_dense=True)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "state/fc.weight" in keys and not any(k.startswith("lut/") for k in keys)
    fresh = WithBatchNorm()
    load_compressed(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_empty_palettes_save_a_dense_model_dense(tmp_path) -> None:
    """Guard for the refusal above: a model that was never clustered, even with a constant
    (zero-initialised) large weight, is a plain dense save."""
    model = WithBatchNorm()
    nn.init.zeros_(model.embed.weight)
    path = save_compressed(model, tmp_path / "m.safetensors", {})
    fresh = WithBatchNorm()
    load_compressed(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_a_palette_stale_after_more_training_is_refused_naming_it(tmp_path) -> None:
    model, palettes = finalized()
    with torch.no_grad():
        model.fc.weight[0, 0] += 0.5  # one more "step" after finalize
    with pytest.raises(ValueError, match=r"fc\.weight: the weight no longer matches the "
                       r"palette \(1 of 2048 elements differ\)"):
        save_compressed(model, tmp_path / "m.safetensors", palettes)


def test_nan_centroids_are_refused_at_save_rather_than_written_unloadable(tmp_path) -> None:
    model, palettes = finalized()
    palette = palettes["embed.weight"]
    palette.lut[0, 0, 0] = float("nan")
    with torch.no_grad():
        model.embed.weight.copy_(palette.weight())
    with pytest.raises(ValueError, match=r"'embed\.weight' has NaN or Inf centroids"):
        save_compressed(model, tmp_path / "m.safetensors", palettes)
    assert not (tmp_path / "m.safetensors").exists()


def beyond_float16() -> tuple[nn.Module, dict[str, Palette]]:
    """The reference model with ``fc`` trained to weights of ~1e5, beyond float16's 65504."""
    model = WithBatchNorm()
    with torch.no_grad():
        model.fc.weight.mul_(1e6)  # U(-1/8, 1/8) -> up to 1.25e5
    return finalized(model)


def test_a_centroid_beyond_float16_keeps_its_lut_in_float32_and_loads_exactly(tmp_path) -> None:
    model, palettes = beyond_float16()
    assert float(palettes["fc.weight"].lut.abs().max()) > 65504
    warning = r"'fc\.weight': centroid -?1\d{5} lies beyond the float16 range"
    with pytest.warns(UserWarning, match=warning):
        path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    entries = json.loads(read_metadata(path)["lightning_dkm.layout"])["clustered"]
    assert entries["fc.weight"]["lut_dtype"] == "float32"
    assert "lut_dtype" not in entries["conv.weight"]  # only where it differs from the file's
    fresh = WithBatchNorm()
    load_compressed(fresh, path)
    assert torch.equal(fresh.fc.weight, model.fc.weight)  # bit for bit, no inf
    conv = palettes["conv.weight"]
    rounded = Palette(conv.lut.half().float(), conv.indices, conv.layout).weight()
    assert torch.equal(fresh.conv.weight, rounded)  # the others still float16


def test_a_float32_kept_lut_is_counted_at_4_bytes_as_on_disk(tmp_path) -> None:
    model, palettes = beyond_float16()
    with pytest.warns(UserWarning, match="float16 range"):
        path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    report = CompressionReport.build(model, palettes)  # lut_dtype float16
    fc = next(layer for layer in report.layers if layer.name == "fc.weight")
    assert fc.lut_dtype == "float32" and fc.lut_bytes == 4 * 8 * 1 * 4  # P=4, k=8, d=1, fp32
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0] + 8
    assert os.path.getsize(path) - header_len == report.total_bytes


def test_read_palettes_returns_the_saved_palettes_of_every_layout(tmp_path) -> None:
    model, palettes = finalized()  # per tensor (embed), grouped (fc), cluster_dim=2 (conv)
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=torch.float32)
    read = read_palettes(path)
    assert read.keys() == palettes.keys()
    for name, palette in palettes.items():
        assert read[name].layout == palette.layout, name
        assert torch.equal(read[name].indices, palette.indices), name
        assert read[name].lut.dtype == torch.float32 and torch.equal(read[name].lut, palette.lut)
        assert torch.equal(read[name].weight(), model.state_dict()[name]), name


def test_read_palettes_of_a_float16_file_holds_the_stored_float16_luts(tmp_path) -> None:
    model, palettes = finalized()
    read = read_palettes(save_compressed(model, tmp_path / "m.safetensors", palettes))
    for name, palette in palettes.items():
        assert torch.equal(read[name].lut, palette.lut.half()), name
        assert torch.equal(read[name].indices, palette.indices), name


# -- loading untrusted files ------------------------------------------------------------------


def rewrite(
    path,
    meta: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
) -> None:
    """Edit a saved artifact and forge a valid checksum, so the checks behind it are reached."""
    with safe_open(str(path), framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta:
        meta(m)
    if tensors:
        tensors(t)
    m["lightning_dkm.sha256"] = artifact_digest(m, t)
    save_file(t, str(path), metadata=m)


def edit_layout(name: str, **changes) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        layout = json.loads(m["lightning_dkm.layout"])
        layout["clustered"][name].update(changes)
        m["lightning_dkm.layout"] = json.dumps(layout)

    return edit


def edit_file_lut_dtype(value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        layout = json.loads(m["lightning_dkm.layout"])
        layout["lut_dtype"] = value
        m["lightning_dkm.layout"] = json.dumps(layout)

    return edit


def edit_without_checksum(path) -> None:
    with safe_open(str(path), framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    m["lightning_dkm.layout"] = m["lightning_dkm.layout"].replace('"bits": 3', '"bits": 2')
    save_file(t, str(path), metadata=m)


def flip_last_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-10]), "not a readable safetensors"),
    "garbage header length": (
        lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "not a readable safetensors"
    ),
    "not safetensors at all": (lambda p: p.write_bytes(b"hello"), "not a readable safetensors"),
    "flipped data byte": (flip_last_byte, "checksum mismatch"),
    "layout edited without the checksum": (edit_without_checksum, "checksum mismatch"),
    "wrong format name": (
        lambda p: rewrite(p, meta=lambda m: m.update({"lightning_dkm.format": "other"})),
        "not a 'lightning_dkm.compressed' file",
    ),
    "wrong version": (
        lambda p: rewrite(p, meta=lambda m: m.update({"lightning_dkm.version": "2"})),
        "unsupported lightning_dkm.version",
    ),
    "layout is not JSON": (
        lambda p: rewrite(p, meta=lambda m: m.update({"lightning_dkm.layout": "{"})),
        "not valid JSON",
    ),
    "bits out of range": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", bits=9)), "bits must be an int"
    ),
    "bits changed": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", bits=2)), "LUT is"
    ),
    "count changed": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", count=100)), "count=100"
    ),
    "axes swapped": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", group_axis=1, vector_axis=0)),
        "LUT is|does not divide",
    ),
    "field of the wrong type": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", shape="32x64")), "malformed"
    ),
    "LUT of the wrong shape": (
        lambda p: rewrite(p, tensors=lambda t: t.update({"lut/fc.weight": torch.zeros(4, 4, 1,
                                                         dtype=torch.float16)})),
        "LUT is",
    ),
    "LUT with NaN": (
        lambda p: rewrite(p, tensors=lambda t: t["lut/fc.weight"].fill_(float("nan"))), "NaN"
    ),
    "packed indices one byte short": (
        lambda p: rewrite(p, tensors=lambda t: t.update(
            {"indices/fc.weight": t["indices/fc.weight"][:-1].clone()})),
        "packed indices are",
    ),
    "missing tensor": (
        lambda p: rewrite(p, tensors=lambda t: t.pop("indices/conv.weight")),
        "do not match the layout",
    ),
    "extra tensor": (
        lambda p: rewrite(p, tensors=lambda t: t.update({"junk": torch.zeros(1)})),
        "do not match the layout",
    ),
    "unknown LUT dtype of one tensor": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", lut_dtype="float64")),
        "layout of 'fc.weight': lut_dtype must be one of",
    ),
    "file LUT dtype not a string": (
        lambda p: rewrite(p, meta=edit_file_lut_dtype(["float16"])),
        r"lut_dtype must be one of \['float16', 'float32'\]; got \['float16'\]",
    ),
    "LUT dtype of one tensor does not match its LUT": (
        lambda p: rewrite(p, meta=edit_layout("fc.weight", lut_dtype="float32")),
        "LUT is torch.float16 .* needs torch.float32",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_file_raises_and_leaves_the_model_untouched(tmp_path, case) -> None:
    corrupt, message = CORRUPTIONS[case]
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    corrupt(path)
    fresh = WithBatchNorm()
    before = state_copy(fresh)
    with pytest.raises(ValueError, match=message) as err:
        load_compressed(fresh, path)
    assert str(err.value).startswith(f"{path}: ")  # names the file
    assert_same_state(fresh.state_dict(), before)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_read_palettes_rejects_a_corrupted_file_as_loading_does(tmp_path, case) -> None:
    corrupt, message = CORRUPTIONS[case]
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    corrupt(path)
    with pytest.raises(ValueError, match=message):
        read_palettes(path)


def test_a_missing_file_raises_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_compressed(WithBatchNorm(), tmp_path / "absent.safetensors")


class NetPlusExtra(WithBatchNorm):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2, bias=False)


class NetMinusBN(WithBatchNorm):
    def __init__(self) -> None:
        super().__init__()
        del self.bn


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: WithBatchNorm(width=128), "'fc.weight' is .* in the file but .* in the model"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "missing from the file: \\[0.bias, 0.weight\\]"),
        (NetPlusExtra, "missing from the file: \\[extra.weight\\]"),
        (NetMinusBN, "not in the model: \\[bn.bias, bn.num_batches_tracked"),
    ],
)
def test_a_file_for_another_architecture_raises(tmp_path, other, message) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    target = other()
    before = state_copy(target)
    with pytest.raises(ValueError, match=message):
        load_compressed(target, path)
    assert_same_state(target.state_dict(), before)


def test_non_strict_loading_fills_the_common_names_only(tmp_path) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=torch.float32)
    target = NetPlusExtra()
    extra_before = target.extra.weight.clone()
    loaded = load_compressed(target, path, strict=False)
    assert loaded.keys() == palettes.keys()
    assert torch.equal(target.fc.weight, model.fc.weight)
    assert torch.equal(target.extra.weight, extra_before)
    with pytest.raises(ValueError, match="in the file but"):
        load_compressed(WithBatchNorm(width=128), path, strict=False)  # shapes must still match
