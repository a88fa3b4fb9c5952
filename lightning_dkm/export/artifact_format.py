"""The artifact's file format: its metadata keys, its digest, and the checks that read an
untrusted file (format, digest, layout, every tensor's shape and byte length) before anything is
written into a model. :mod:`.artifact` writes and loads through it; the layout of the file is
described there.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..engine.bitpack import packed_size, unpack_bits
from ..engine.layout import ClusterSpec, PaletteLayout
from ..engine.palette import LUT_DTYPES, Palette

FORMAT_NAME = "lightning_dkm.compressed"
FORMAT_VERSION = "1"

_PREFIX = "lightning_dkm."
_KEY_FORMAT = _PREFIX + "format"
_KEY_VERSION = _PREFIX + "version"
_KEY_LAYOUT = _PREFIX + "layout"
_KEY_DIGEST = _PREFIX + "sha256"

_LUT, _SCALE, _INDICES, _STATE = "lut/", "scale/", "indices/", "state/"
_LUT_DTYPES = LUT_DTYPES  # a file records a LUT dtype by its name: "float16" or "float32"
_ENTRY_KEYS = {
    "shape", "dtype", "bits", "cluster_dim", "group_size", "group_axis", "vector_axis", "count",
}
# lut_dtype only where it differs from the file's; per_channel_scale only where it is true
_OPTIONAL_ENTRY_KEYS = {"lut_dtype", "per_channel_scale"}
_REQUIRED_METADATA = (_KEY_FORMAT, _KEY_VERSION, _KEY_LAYOUT, _KEY_DIGEST)

# A weight "looks clustered" when it is a Parameter of >= 2 dims, at least this large (the
# default min_size of targets.select_targets, not imported: artifact sits below targets), and
# holds 2..256 distinct values: what finalize leaves behind with one palette of <= 8 bits.
_LOOKS_CLUSTERED_MIN_SIZE = 2048
_LOOKS_CLUSTERED_MAX_VALUES = 256
_LOOKS_CLUSTERED_PROBE = 4096  # more distinct values than this many leading elements: dense


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over every metadata entry but the digest and every tensor (name, dtype, shape,
    bytes), in sorted order, so any change to the file's content changes it."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != _KEY_DIGEST:
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"tensor\0{key}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



# -- loading --------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the artifact file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise ValueError(
            f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; "
            f"safetensors says: {err}). It is truncated (an interrupted copy or download) or "
            "not a safetensors file at all; copy it again or re-save it with save_compressed()"
        ) from err
    return metadata, tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a compressed artifact (format entries and user metadata)."""
    metadata, _ = _read(Path(path))
    return metadata


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _entry_lut_dtype(path: Path, name: str, entry: dict, default: torch.dtype) -> torch.dtype:
    """The dtype the LUT of ``name`` is stored at: its entry's ``lut_dtype`` or the file's."""
    if "lut_dtype" not in entry:
        return default
    if not isinstance(entry["lut_dtype"], str) or entry["lut_dtype"] not in _LUT_DTYPES:
        raise _fail(path, f"layout of {name!r}: lut_dtype must be one of {list(_LUT_DTYPES)}; "
                          f"got {entry['lut_dtype']!r}")
    return _LUT_DTYPES[entry["lut_dtype"]]


def _parse_layout(path: Path, text: str) -> tuple[dict[str, PaletteLayout],
                                                   dict[str, torch.dtype], dict[str, str]]:
    """The layouts of the clustered tensors, the dtype of each one's LUT, and the aliases."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(path, f"{_KEY_LAYOUT} is not valid JSON ({err})") from err
    required, optional = {"lut_dtype", "clustered", "aliases"}, {"parameters"}
    if not isinstance(data, dict) or not required <= set(data) <= required | optional:
        raise _fail(path, f"{_KEY_LAYOUT} must hold exactly lut_dtype, clustered and aliases "
                          "(and optionally parameters)")
    parameters = data.get("parameters", [])
    if not isinstance(parameters, list) or not all(isinstance(n, str) for n in parameters):
        raise _fail(path, "parameters must be a list of names")
    if not isinstance(data["lut_dtype"], str) or data["lut_dtype"] not in _LUT_DTYPES:
        raise _fail(path, f"lut_dtype must be one of {list(_LUT_DTYPES)}; got "
                          f"{data['lut_dtype']!r}")
    file_lut_dtype = _LUT_DTYPES[data["lut_dtype"]]
    aliases = data["aliases"]
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise _fail(path, "aliases must map names to names")
    if not isinstance(data["clustered"], dict):
        raise _fail(path, "clustered must map names to layouts")
    layouts: dict[str, PaletteLayout] = {}
    lut_dtypes: dict[str, torch.dtype] = {}
    for name, entry in data["clustered"].items():
        if not isinstance(entry, dict) or not (
            _ENTRY_KEYS <= set(entry) <= _ENTRY_KEYS | _OPTIONAL_ENTRY_KEYS
        ):
            raise _fail(path, f"layout of {name!r} must have exactly the keys "
                              f"{sorted(_ENTRY_KEYS)} (and optionally "
                              f"{sorted(_OPTIONAL_ENTRY_KEYS)})")
        lut_dtypes[name] = _entry_lut_dtype(path, name, entry, file_lut_dtype)
        shape = entry["shape"]
        ints_ok = (
            isinstance(shape, list) and all(_is_int(s) for s in shape)
            and all(_is_int(entry[k]) for k in ("count", "group_axis", "vector_axis"))
            and isinstance(entry["dtype"], str)
        )
        if not ints_ok:
            raise _fail(path, f"layout of {name!r} has malformed fields: {entry!r}")
        scaled = entry.get("per_channel_scale", False)
        if scaled is not True and "per_channel_scale" in entry:
            raise _fail(path, f"layout of {name!r}: per_channel_scale must be true when present; "
                              f"got {scaled!r}")
        try:
            spec = ClusterSpec(entry["bits"], entry["cluster_dim"], entry["group_size"],
                               per_channel_scale=scaled)
            layout = PaletteLayout(
                tuple(shape), spec, entry["group_axis"], entry["vector_axis"], name=name
            )
        except (ValueError, TypeError) as err:
            raise _fail(path, f"invalid layout for {name!r}: {err}") from err
        if entry["count"] != layout.num_palettes * layout.vectors_per_palette:
            raise _fail(path, f"{name!r}: count={entry['count']} does not match its layout "
                              f"({layout.num_palettes * layout.vectors_per_palette} indices)")
        layouts[name] = layout
    return layouts, lut_dtypes, aliases


def _check_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """The file must say it is a lightning_dkm artifact of this version, with every entry."""
    if not any(key.startswith(_PREFIX) for key in metadata):
        raise _fail(path, "has no lightning_dkm metadata: it is a safetensors file, but not one "
                          "written by lightning_dkm.save_compressed() (a plain state dict loads "
                          "with safetensors.torch.load_file() and model.load_state_dict())")
    fmt, version = metadata.get(_KEY_FORMAT), metadata.get(_KEY_VERSION)
    if fmt != FORMAT_NAME:
        raise _fail(path, f"not a {FORMAT_NAME!r} file ({_KEY_FORMAT}={fmt!r})")
    if version != FORMAT_VERSION:
        raise _fail(path, f"unsupported {_KEY_VERSION}={version!r}; this version reads "
                          f"{FORMAT_VERSION!r}")
    absent = [key for key in _REQUIRED_METADATA if key not in metadata]
    if absent:
        raise _fail(path, f"the metadata entries {absent} are missing: the header was edited "
                          "or the file was not written by save_compressed(); re-save it")


def _decode(
    path: Path, metadata: dict[str, str], tensors: dict[str, Tensor]
) -> tuple[dict[str, Palette], dict[str, Tensor], dict[str, str]]:
    """Validate the file on its own and decode it: palettes (LUT in the stored dtype, int64
    indices, on CPU), the other tensors, and the aliases."""
    _check_metadata(path, metadata)
    if metadata[_KEY_DIGEST] != _digest(metadata, tensors):
        raise _fail(path, "checksum mismatch: the file is corrupted or was modified")
    layouts, lut_dtypes, aliases = _parse_layout(path, metadata[_KEY_LAYOUT])

    state = {k.removeprefix(_STATE): t for k, t in tensors.items() if k.startswith(_STATE)}
    expected = {_STATE + n for n in state} | {p + n for n in layouts for p in (_LUT, _INDICES)}
    expected |= {_SCALE + n for n, layout in layouts.items() if layout.spec.per_channel_scale}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise _fail(path, f"tensors do not match the layout: missing {sorted(missing)}, "
                          f"unexpected {sorted(unexpected)}")
    both = set(state) & set(layouts)
    if both:
        raise _fail(path, f"names stored both clustered and dense: {sorted(both)}")
    for alias, target in aliases.items():
        if alias in state or alias in layouts or (target not in state and target not in layouts):
            raise _fail(path, f"alias {alias!r} -> {target!r} does not name a stored tensor")

    palettes = {}
    for name, layout in layouts.items():
        lut, packed = tensors[_LUT + name], tensors[_INDICES + name]
        P, n, d = layout.palette_shape
        k = layout.spec.num_centroids
        lut_dtype = lut_dtypes[name]
        if lut.dtype != lut_dtype or tuple(lut.shape) != (P, k, d):
            raise _fail(path, f"{name!r}: LUT is {lut.dtype} {tuple(lut.shape)}; the layout "
                              f"needs {lut_dtype} {(P, k, d)}")
        if not bool(torch.isfinite(lut).all()):
            raise _fail(path, f"{name!r}: LUT contains NaN or Inf")
        size = packed_size(P * n, layout.spec.bits)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (size,):
            raise _fail(path, f"{name!r}: packed indices are {packed.dtype} "
                              f"{tuple(packed.shape)}; the layout needs uint8 ({size},)")
        scale = tensors.get(_SCALE + name)
        if scale is not None and (scale.dtype != lut_dtype or tuple(scale.shape)
                                  != layout.scale_shape):
            raise _fail(path, f"{name!r}: scales are {scale.dtype} {tuple(scale.shape)}; the "
                              f"layout needs {lut_dtype} {layout.scale_shape}")
        try:
            indices = unpack_bits(packed, layout.spec.bits, P * n).view(P, n)
            palettes[name] = Palette(lut=lut, indices=indices, layout=layout, scale=scale)
        except ValueError as err:
            raise _fail(path, f"{name!r}: {err}") from err
    return palettes, state, aliases


def _compatible(source: Tensor, target: Tensor) -> bool:
    both_float = source.is_floating_point() and target.is_floating_point()
    return tuple(source.shape) == tuple(target.shape) and (
        both_float or source.dtype == target.dtype
    )


def _listing(names: set[str], limit: int = 10) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more
