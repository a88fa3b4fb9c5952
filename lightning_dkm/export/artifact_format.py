"""The artifact's file format: its metadata keys, its digest, and the checks that read an
untrusted file (what the path is, format, digest, a layout JSON of bounded depth and number
length, every tensor's shape and byte length) before anything is decoded or written into a
model; and whether the ``compression_report.json`` beside an artifact belongs to it.
:mod:`.artifact` writes and loads through it (every name here is public within the package
for that); the layout of the file is described there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..engine.bitpack import packed_size, unpack_bits
from ..engine.layout import PaletteLayout, is_int
from ..engine.palette import LUT_DTYPES, Palette
from .files import describe_path
from .report import REPORT_JSON, artifact_entry
from .report_entries import dtype_name

FORMAT_NAME = "lightning_dkm.compressed"
FORMAT_VERSION = "1"

METADATA_PREFIX = "lightning_dkm."
KEY_FORMAT = METADATA_PREFIX + "format"
KEY_VERSION = METADATA_PREFIX + "version"
KEY_LAYOUT = METADATA_PREFIX + "layout"
KEY_DIGEST = METADATA_PREFIX + "sha256"

# the tensors' name prefixes; a file records a LUT dtype by its name (LUT_DTYPES)
LUT, SCALE, INDICES, STATE = "lut/", "scale/", "indices/", "state/"
_ENTRY_KEYS = {
    "shape", "dtype", "bits", "cluster_dim", "group_size", "group_axis", "vector_axis", "count",
}
# lut_dtype only where it differs from the file's; per_channel_scale only where it is true
_OPTIONAL_ENTRY_KEYS = {"lut_dtype", "per_channel_scale"}
_REQUIRED_METADATA = (KEY_FORMAT, KEY_VERSION, KEY_LAYOUT, KEY_DIGEST)


def digest(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over every metadata entry but the digest and every tensor (name, dtype, shape,
    bytes), in sorted order, so any change to the file's content changes it."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != KEY_DIGEST:
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"tensor\0{key}\0{dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        # the bytes in place (no copy): memory stays at the file's size
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()



# -- reading an untrusted file (what is checked, and when: artifact.py's module docstring) ----
# The safetensors header (<= 100 MB, its offsets checked against the file's size by
# safetensors) is the only thing read before these checks.

_MAX_JSON_DEPTH = 16  # the layout nests 4 deep (file -> clustered -> entry -> shape)
_MAX_INT_DIGITS = 20  # every integer of the format fits in 64 bits
_MAX_FLOAT_CHARS = 40  # json.dumps writes a float in at most 24
_MAX_DIMS = 8  # of a clustered tensor (a Conv3d weight has 5)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


class _JSONLimit(ValueError):
    """A number in a JSON text that the format never holds (too long, NaN, a fraction)."""


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: file contents quoted in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays/objects more than ``limit`` deep, in C-speed
    passes: strings removed, then only brackets kept, then one level of empty pairs removed per
    pass (an unbalanced text is left to the parser, which names the position)."""
    if text.count("[") + text.count("{") <= limit:  # the common case for large texts: names
        return False
    rest = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(limit):
        if not rest:
            return False
        rest, removed = _EMPTY_PAIR.subn("", rest)
        if not removed:
            return False
    return bool(rest)


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise _JSONLimit(f"an integer of {digits:,} digits (the format's integers have at "
                         f"most {_MAX_INT_DIGITS})")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > _MAX_FLOAT_CHARS:
        raise _JSONLimit(f"a number written in {len(text):,} characters")
    return float(text)


def _no_float(text: str) -> float:
    raise _JSONLimit(f"the number {_short(text, 30)}, where only integers belong")


def _no_constant(name: str) -> Any:
    raise _JSONLimit(f"{name}, which is not standard JSON")


def load_bounded_json(text: str, what: str, *, floats: bool = False) -> Any:
    """``json.loads(text)`` for untrusted text: at most :data:`_MAX_JSON_DEPTH` levels deep,
    integers of at most 20 digits, no ``NaN`` / ``Infinity`` (and no fractions unless
    ``floats``). Every failure is a ``ValueError`` starting with ``what``."""
    if _nests_deeper_than(text, _MAX_JSON_DEPTH):
        raise ValueError(f"{what} nests deeper than {_MAX_JSON_DEPTH} levels; the format "
                         "never does: the file was edited or forged")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant,
                          parse_float=_bounded_float if floats else _no_float)
    except _JSONLimit as err:
        raise ValueError(f"{what} holds {err}: the file was edited or forged") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON ({err})") from err
    except RecursionError as err:  # not reached below the depth limit; kept as a backstop
        raise ValueError(f"{what} nests too deep to read") from err


def _check_regular_file(path: Path) -> None:
    """Raise unless ``path`` is a regular file (after symlinks), saying what it is instead:
    ``FileNotFoundError`` (missing), ``IsADirectoryError``, ``ValueError`` (a FIFO, a device,
    a socket: reading one could block or never end); other ``OSError``s (permission, a loop of
    symlinks) name the path as the OS reports it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory; pass the artifact file inside it")
    raise ValueError(f"{path} is {describe_path(path)}, not a file; pass the artifact file itself")


def read_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of the safetensors file ``path``, nothing checked beyond what
    safetensors checks; a ``ValueError`` naming the file for one it cannot read."""
    _check_regular_file(path)
    with open(path, "rb"):
        pass  # a file we may not read: PermissionError naming it, not "not safetensors"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise ValueError(
            f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; "
            f"safetensors says: {_short(str(err), 300)}). It is truncated (an interrupted copy "
            "or download) or not a safetensors file at all; copy it again or re-save it with "
            "save_compressed()"
        ) from err
    return metadata, tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a compressed artifact (format entries and user metadata)."""
    metadata, _ = read_file(Path(path))
    return metadata


def file_error(path: Path, message: str) -> ValueError:
    """The error for what is wrong with the file ``path``."""
    return ValueError(f"{path}: {message}")


def _lut_dtype(path: Path, where: str, value: Any) -> torch.dtype:
    """The LUT dtype a file names (the file's, or one clustered tensor's where it differs)."""
    if not isinstance(value, str) or value not in LUT_DTYPES:
        raise file_error(path, f"{where}lut_dtype must be one of {list(LUT_DTYPES)}; got "
                               f"{_short(value)}")
    return LUT_DTYPES[value]


def _is_float_dtype_name(value: Any) -> bool:
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _parse_entry(path: Path, name: str, entry: Any) -> PaletteLayout:
    """The layout of one clustered tensor, from its (untrusted) entry."""
    if not isinstance(entry, dict) or not (
        _ENTRY_KEYS <= set(entry) <= _ENTRY_KEYS | _OPTIONAL_ENTRY_KEYS
    ):
        raise file_error(path, f"layout of {_short(name)} must have exactly the keys "
                               f"{sorted(_ENTRY_KEYS)} (and optionally "
                               f"{sorted(_OPTIONAL_ENTRY_KEYS)})")
    shape = entry["shape"]
    ints_ok = (
        isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(is_int(s, 0) for s in shape)
        and all(is_int(entry[k], 0) for k in ("count", "group_axis", "vector_axis"))
        and _is_float_dtype_name(entry["dtype"])
    )
    if not ints_ok:
        raise file_error(path, f"layout of {_short(name)} has malformed fields: "
                               f"{_short(entry, 300)}")
    if entry.get("per_channel_scale", True) is not True:
        raise file_error(path, f"layout of {_short(name)}: per_channel_scale must be true when "
                               f"present; got {_short(entry['per_channel_scale'])}")
    label = name if len(name) <= 80 else _short(name)  # what its error messages quote
    try:
        layout = PaletteLayout.from_dict(entry, name=label)
    except (ValueError, TypeError) as err:
        raise file_error(path, f"invalid layout for {_short(name)}: {err}") from err
    if entry["count"] != layout.num_palettes * layout.vectors_per_palette:
        raise file_error(path, f"{_short(name)}: count={entry['count']} does not match its layout "
                               f"({layout.num_palettes * layout.vectors_per_palette} indices)")
    return layout if label == name else replace(layout, name=name)


@dataclass(frozen=True)
class _Layout:
    """The parsed ``lightning_dkm.layout`` entry."""

    lut_dtype: torch.dtype  # the file's
    layouts: dict[str, PaletteLayout]
    lut_dtypes: dict[str, torch.dtype]  # each clustered tensor's LUT dtype
    dtypes: dict[str, str]  # each clustered tensor's dtype in the model that was saved
    aliases: dict[str, str]
    parameters: frozenset[str]


def _parse_layout(path: Path, text: str) -> _Layout:
    """The layouts of the clustered tensors, the dtype of each one's LUT, and the aliases."""
    data = load_bounded_json(text, f"{path}: {KEY_LAYOUT}")
    if not isinstance(data, dict) or set(data) != {"lut_dtype", "clustered", "aliases",
                                                   "parameters"}:
        raise file_error(path, f"{KEY_LAYOUT} must hold exactly lut_dtype, clustered, aliases and "
                               "parameters")
    parameters = data["parameters"]
    if not isinstance(parameters, list) or not set(map(type, parameters)) <= {str}:
        raise file_error(path, "parameters must be a list of names")
    file_lut_dtype = _lut_dtype(path, "", data["lut_dtype"])
    aliases = data["aliases"]
    if not isinstance(aliases, dict) or not set(map(type, aliases.values())) <= {str}:
        raise file_error(path, "aliases must map names to names")
    if not isinstance(data["clustered"], dict):
        raise file_error(path, "clustered must map names to layouts")
    layouts, lut_dtypes, dtypes = {}, {}, {}
    for name, entry in data["clustered"].items():
        layouts[name] = _parse_entry(path, name, entry)
        lut_dtypes[name] = (_lut_dtype(path, f"layout of {_short(name)}: ", entry["lut_dtype"])
                            if "lut_dtype" in entry else file_lut_dtype)
        dtypes[name] = entry["dtype"]
    return _Layout(file_lut_dtype, layouts, lut_dtypes, dtypes, aliases, frozenset(parameters))


def _check_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """The file must say it is a lightning_dkm artifact of this version, with every entry."""
    if not any(key.startswith(METADATA_PREFIX) for key in metadata):
        raise file_error(path, "has no lightning_dkm metadata: it is a safetensors file, but not "
                               "one written by lightning_dkm.save_compressed() (a plain state "
                               "dict loads with safetensors.torch.load_file() and "
                               "model.load_state_dict())")
    fmt, version = metadata.get(KEY_FORMAT), metadata.get(KEY_VERSION)
    if fmt != FORMAT_NAME:
        raise file_error(path, f"not a {FORMAT_NAME!r} file ({KEY_FORMAT}={_short(fmt)})")
    if version != FORMAT_VERSION:
        raise file_error(path, f"unsupported {KEY_VERSION}={_short(version)}; this version reads "
                               f"{FORMAT_VERSION!r}")
    absent = [key for key in _REQUIRED_METADATA if key not in metadata]
    if absent:
        raise file_error(path, f"the metadata entries {absent} are missing: the header was edited "
                               "or the file was not written by save_compressed(); re-save it")


@dataclass(frozen=True)
class CheckedFile:
    """An artifact checked on its own, nothing decoded yet: its layout, the stored LUTs,
    packed indices and scales (shapes and byte lengths checked against the layout), and the
    dense tensors (``state``), all as the file holds them."""

    path: Path
    layout: _Layout
    tensors: dict[str, Tensor]
    state: dict[str, Tensor]


def listed(names: set[str] | list[str], *, quote: bool = True, limit: int = 10) -> str:
    """``[a, b, ... and N more]``: at most ``limit`` of ``names``, sorted, each quoted as file
    contents are quoted (``repr``, long ones cut); ``quote=False`` writes names of at most 80
    characters as they are."""
    ordered = sorted(names)
    shown = [n if not quote and len(n) <= 80 else _short(n) for n in ordered[:limit]]
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"[{', '.join(shown)}{more}]"


def check_file(path: Path) -> CheckedFile:
    """Read the file ``path`` (:func:`read_file`) and validate it on its own, as :mod:`.artifact`'s
    module docstring lists, the aliases and parameter names against the stored tensors too.
    Allocates nothing beyond reading."""
    metadata, tensors = read_file(path)
    _check_metadata(path, metadata)
    if metadata[KEY_DIGEST] != digest(metadata, tensors):
        raise file_error(path, "checksum mismatch: the file is corrupted or was modified")
    parsed = _parse_layout(path, metadata[KEY_LAYOUT])
    layouts, aliases = parsed.layouts, parsed.aliases

    state = {k.removeprefix(STATE): t for k, t in tensors.items() if k.startswith(STATE)}
    expected = {STATE + n for n in state} | {p + n for n in layouts for p in (LUT, INDICES)}
    expected |= {SCALE + n for n, layout in layouts.items() if layout.spec.per_channel_scale}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise file_error(path, f"tensors do not match the layout: missing {listed(missing)}, "
                               f"unexpected {listed(unexpected)}")
    both = set(state) & set(layouts)
    if both:
        raise file_error(path, f"names stored both clustered and dense: {listed(both)}")
    for alias, target in aliases.items():
        if alias in state or alias in layouts or (target not in state and target not in layouts):
            raise file_error(path, f"alias {_short(alias)} -> {_short(target)} does not name a "
                                   "stored tensor")
    strays = parsed.parameters - set(state) - set(layouts)
    if strays:
        raise file_error(path, f"parameters names tensors the file does not hold: {listed(strays)}")

    for name, layout in layouts.items():
        lut, packed = tensors[LUT + name], tensors[INDICES + name]
        P, n, d = layout.palette_shape
        lut_dtype = parsed.lut_dtypes[name]
        if lut.dtype != lut_dtype or tuple(lut.shape) != (P, layout.spec.num_centroids, d):
            raise file_error(path, f"{_short(name)}: LUT is {lut.dtype} {tuple(lut.shape)}; the "
                                   f"layout needs {lut_dtype} {(P, layout.spec.num_centroids, d)}")
        if not bool(torch.isfinite(lut).all()):
            raise file_error(path, f"{_short(name)}: LUT contains NaN or Inf")
        size = packed_size(P * n, layout.spec.bits)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (size,):
            raise file_error(path, f"{_short(name)}: packed indices are {packed.dtype} "
                                   f"{tuple(packed.shape)}; the layout needs uint8 ({size},)")
        scale = tensors.get(SCALE + name)
        if scale is None:
            continue
        if scale.dtype != lut_dtype or tuple(scale.shape) != layout.scale_shape:
            raise file_error(path, f"{_short(name)}: scales are {scale.dtype} "
                                   f"{tuple(scale.shape)}; the layout needs {lut_dtype} "
                                   f"{layout.scale_shape}")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise file_error(path, f"{_short(name)}: per-channel scales must be finite floats > 0")
    return CheckedFile(path, parsed, tensors, state)


def decode_palettes(checked: CheckedFile, names: Iterable[str] | None = None
                    ) -> dict[str, Palette]:
    """The palettes of ``names`` (default: every clustered tensor): LUT in the stored dtype,
    int64 indices (8 bytes per stored index: call it once the file, and the model it goes
    into, have been checked), on CPU."""
    layouts = checked.layout.layouts
    palettes = {}
    for name in layouts if names is None else names:
        layout = layouts[name]
        P, n, _ = layout.palette_shape
        try:
            indices = unpack_bits(checked.tensors[INDICES + name], layout.spec.bits, P * n)
            palettes[name] = Palette(lut=checked.tensors[LUT + name], indices=indices.view(P, n),
                                     layout=layout, scale=checked.tensors.get(SCALE + name))
        except ValueError as err:
            raise file_error(checked.path, f"{_short(name)}: {err}") from err
    return palettes


# -- the report beside an artifact -----------------------------------------------------------

_MAX_REPORT_BYTES = 64 << 20  # a report of ~100k tensors; a larger file is not checked


class ReportMismatchWarning(UserWarning):
    """The ``compression_report.json`` beside an artifact describes another artifact file."""


def report_mismatch(path: Path) -> str | None:
    """Why the ``compression_report.json`` beside the artifact ``path`` does not belong to it,
    or ``None``: its ``artifact`` entry (:func:`~lightning_dkm.export.report.artifact_entry`)
    names this file (``file`` equal to ``path``'s name) but records other ``bytes`` or another
    ``sha256`` (of the whole file) than the file has.
    ``None`` as well when they match, when there is no report, no such entry or an entry for
    another file name, and when the report cannot be read (it is not this check's to judge)."""
    report = path.parent / REPORT_JSON
    try:
        info = os.stat(report)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_REPORT_BYTES:
            return None
        data = load_bounded_json(report.read_text(encoding="utf-8"), str(report), floats=True)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    entry = data.get("artifact") if isinstance(data, dict) else None
    if not isinstance(entry, dict) or entry.get("file") != path.name:
        return None
    recorded_bytes, recorded_sha = entry.get("bytes"), entry.get("sha256")
    size = path.stat().st_size
    if is_int(recorded_bytes, 0) and recorded_bytes != size:
        found = f"{recorded_bytes:,} bytes, but the file has {size:,}"
    elif isinstance(recorded_sha, str) and recorded_sha.lower() != (
        actual := artifact_entry(path)["sha256"]
    ):
        found = f"sha256 {_short(recorded_sha)}, but the file's is {actual!r}"
    else:
        return None
    return (f"{report} does not describe the artifact {path} beside it: its 'artifact' entry "
            f"records {found}. Another run (or a copy) replaced one of the two; the report's "
            f"numbers are not this file's (lightning-dkm inspect {path} prints the file's own)")
