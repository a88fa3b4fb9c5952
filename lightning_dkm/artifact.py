"""The compressed artifact: one safetensors file holding a clustered model at its stored size.

Layout of the file (no pickle anywhere; ``safetensors`` parses it):

* ``lut/<name>``: the LUTs of clustered tensor ``<name>``, shape ``(P, 2**bits, cluster_dim)``,
  dtype float16 or float32;
* ``indices/<name>``: its ``P * n`` palette indices (an index addresses one ``cluster_dim``-vector)
  bit-packed at exactly ``bits`` bits each (:mod:`lightning_dkm.bitpack`), a 1-D uint8 tensor;
* ``state/<name>``: every other tensor of ``model.state_dict()``, as it is; a tensor reachable
  under several names (tied weights) is stored once and the other names are recorded as aliases;
* string metadata: ``lightning_dkm.format`` (``"lightning_dkm.compressed"``),
  ``lightning_dkm.version`` (``"1"``), ``lightning_dkm.layout`` (JSON: per clustered tensor its
  shape, dtype, bits, cluster_dim, group_size, group_axis, vector_axis and index count, plus the
  aliases), ``lightning_dkm.sha256`` (a digest of every tensor and every other metadata entry),
  and any user metadata.

:func:`load_compressed` treats the file as untrusted: it checks the format, the digest, the
layout, every tensor's shape and byte length, and the match with the target model, all before
the first write into the model, and raises ``ValueError`` on any mismatch. The file's tensor
data is exactly :attr:`CompressionReport.total_bytes <lightning_dkm.report.CompressionReport>`
bytes.
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
from safetensors.torch import save_file
from torch import Tensor, nn

from ._state import state_tensors
from .bitpack import pack_bits, packed_size, unpack_bits
from .layout import ClusterSpec, PaletteLayout
from .palette import Palette

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_compressed", "read_metadata", "save_compressed"]

FORMAT_NAME = "lightning_dkm.compressed"
FORMAT_VERSION = "1"

_PREFIX = "lightning_dkm."
_KEY_FORMAT = _PREFIX + "format"
_KEY_VERSION = _PREFIX + "version"
_KEY_LAYOUT = _PREFIX + "layout"
_KEY_DIGEST = _PREFIX + "sha256"

_LUT, _INDICES, _STATE = "lut/", "indices/", "state/"
_LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_ENTRY_KEYS = {
    "shape", "dtype", "bits", "cluster_dim", "group_size", "group_axis", "vector_axis", "count",
}


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


# -- saving ---------------------------------------------------------------------------------


def _check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"metadata must map str to str; got {key!r}: {type(value).__name__}"
            )
        if key.startswith(_PREFIX):
            raise ValueError(f"metadata key {key!r} is reserved (keys starting with {_PREFIX!r})")
        out[key] = value
    return out


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    palettes: Mapping[str, Palette],
    *,
    lut_dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the finalized ``model`` as LUTs + bit-packed indices + its other tensors.

    Args:
        model: the model after :func:`~lightning_dkm.finalize` or
            :func:`~lightning_dkm.palettize`; each clustered weight must equal
            ``palettes[name].weight()``.
        path: the file to write (replaced atomically).
        palettes: what ``finalize``/``palettize`` returned. They are required rather than
            re-derived from the weights because they carry the layout (bits, cluster_dim,
            group_size, axes), which the weights alone do not.
        lut_dtype: ``torch.float16`` (half the LUT bytes; the loaded weights are the
            fp16-rounded centroids) or ``torch.float32`` (loads bit for bit).
        metadata: extra ``str -> str`` entries for the file header.

    Returns:
        The path written.

    Raises:
        ValueError: an unsupported ``lut_dtype``, a palette with no tensor of its name in
            ``model.state_dict()`` or one that differs from that tensor, non-tensor state
            (``get_extra_state``), or bad ``metadata``.
    """
    if lut_dtype not in _LUT_DTYPES.values():
        raise ValueError(f"lut_dtype must be one of {list(_LUT_DTYPES)}; got {lut_dtype}")
    if not isinstance(palettes, Mapping):
        raise ValueError(
            f"palettes must be the mapping returned by finalize()/palettize(); got "
            f"{type(palettes).__name__}"
        )
    user_metadata = _check_user_metadata(metadata)
    state = state_tensors(model, preferred=palettes)
    if state.non_tensors:
        raise ValueError(
            f"state_dict entries that are not tensors cannot be stored without pickle: "
            f"{', '.join(state.non_tensors)}"
        )

    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, palette in palettes.items():
        weight = state.tensors.get(name)
        if weight is None:
            raise ValueError(
                f"palette {name!r} has no tensor of that name in model.state_dict(); pass the "
                "finalized model (after finalize() or palettize()) and its palettes"
            )
        layout, spec = palette.layout, palette.layout.spec
        if tuple(weight.shape) != layout.shape or not torch.equal(
            palette.weight().to(device=weight.device, dtype=weight.dtype), weight
        ):
            raise ValueError(
                f"palette {name!r} does not reproduce the model's {name!r}; pass the palettes "
                "that finalize()/palettize() returned for this model"
            )
        tensors[_LUT + name] = palette.lut.detach().to("cpu", lut_dtype).contiguous()
        tensors[_INDICES + name] = pack_bits(palette.indices.detach().cpu(), spec.bits)
        entries[name] = {
            "shape": list(layout.shape),
            "dtype": _dtype_name(weight.dtype),
            "bits": spec.bits,
            "cluster_dim": spec.cluster_dim,
            "group_size": spec.group_size,
            "group_axis": layout.group_axis,
            "vector_axis": layout.vector_axis,
            "count": palette.num_indices,
        }
    storages: set[tuple] = set()
    for name, t in state.tensors.items():
        if name in palettes:
            continue
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in storages:  # a partial view of a stored tensor: store a copy
            t = t.clone()
        storages.add(key)
        tensors[_STATE + name] = t

    header = {
        **user_metadata,
        _KEY_FORMAT: FORMAT_NAME,
        _KEY_VERSION: FORMAT_VERSION,
        _KEY_LAYOUT: json.dumps(
            {"lut_dtype": _dtype_name(lut_dtype), "clustered": entries, "aliases": state.aliases},
            sort_keys=True,
        ),
    }
    header[_KEY_DIGEST] = _digest(header, tensors)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- loading --------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    return metadata, tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a compressed artifact (format entries and user metadata)."""
    metadata, _ = _read(Path(path))
    return metadata


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _parse_layout(path: Path, text: str) -> tuple[torch.dtype, dict[str, PaletteLayout],
                                                   dict[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(path, f"{_KEY_LAYOUT} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != {"lut_dtype", "clustered", "aliases"}:
        raise _fail(path, f"{_KEY_LAYOUT} must hold exactly lut_dtype, clustered and aliases")
    if data["lut_dtype"] not in _LUT_DTYPES:
        raise _fail(path, f"lut_dtype must be one of {list(_LUT_DTYPES)}; got "
                          f"{data['lut_dtype']!r}")
    aliases = data["aliases"]
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise _fail(path, "aliases must map names to names")
    if not isinstance(data["clustered"], dict):
        raise _fail(path, "clustered must map names to layouts")
    layouts: dict[str, PaletteLayout] = {}
    for name, entry in data["clustered"].items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise _fail(path, f"layout of {name!r} must have exactly the keys "
                              f"{sorted(_ENTRY_KEYS)}")
        shape = entry["shape"]
        ints_ok = (
            isinstance(shape, list) and all(_is_int(s) for s in shape)
            and all(_is_int(entry[k]) for k in ("count", "group_axis", "vector_axis"))
            and isinstance(entry["dtype"], str)
        )
        if not ints_ok:
            raise _fail(path, f"layout of {name!r} has malformed fields: {entry!r}")
        try:
            spec = ClusterSpec(entry["bits"], entry["cluster_dim"], entry["group_size"])
            layout = PaletteLayout(
                tuple(shape), spec, entry["group_axis"], entry["vector_axis"], name=name
            )
        except (ValueError, TypeError) as err:
            raise _fail(path, f"invalid layout for {name!r}: {err}") from err
        if entry["count"] != layout.num_palettes * layout.vectors_per_palette:
            raise _fail(path, f"{name!r}: count={entry['count']} does not match its layout "
                              f"({layout.num_palettes * layout.vectors_per_palette} indices)")
        layouts[name] = layout
    return _LUT_DTYPES[data["lut_dtype"]], layouts, aliases


def _decode(
    path: Path, metadata: dict[str, str], tensors: dict[str, Tensor]
) -> tuple[dict[str, Palette], dict[str, Tensor], dict[str, str]]:
    """Validate the file on its own and decode it: palettes (LUT in the stored dtype, int64
    indices, on CPU), the other tensors, and the aliases."""
    fmt, version = metadata.get(_KEY_FORMAT), metadata.get(_KEY_VERSION)
    if fmt != FORMAT_NAME:
        raise _fail(path, f"not a {FORMAT_NAME!r} file ({_KEY_FORMAT}={fmt!r})")
    if version != FORMAT_VERSION:
        raise _fail(path, f"unsupported {_KEY_VERSION}={version!r}; this version reads "
                          f"{FORMAT_VERSION!r}")
    if metadata.get(_KEY_DIGEST) != _digest(metadata, tensors):
        raise _fail(path, "checksum mismatch: the file is corrupted or was modified")
    lut_dtype, layouts, aliases = _parse_layout(path, metadata.get(_KEY_LAYOUT, ""))

    state = {k.removeprefix(_STATE): t for k, t in tensors.items() if k.startswith(_STATE)}
    expected = {_STATE + n for n in state} | {p + n for n in layouts for p in (_LUT, _INDICES)}
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
        if lut.dtype != lut_dtype or tuple(lut.shape) != (P, k, d):
            raise _fail(path, f"{name!r}: LUT is {lut.dtype} {tuple(lut.shape)}; the layout "
                              f"needs {lut_dtype} {(P, k, d)}")
        if not bool(torch.isfinite(lut).all()):
            raise _fail(path, f"{name!r}: LUT contains NaN or Inf")
        size = packed_size(P * n, layout.spec.bits)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (size,):
            raise _fail(path, f"{name!r}: packed indices are {packed.dtype} "
                              f"{tuple(packed.shape)}; the layout needs uint8 ({size},)")
        try:
            indices = unpack_bits(packed, layout.spec.bits, P * n).view(P, n)
            palettes[name] = Palette(lut=lut, indices=indices, layout=layout)
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


@torch.no_grad()
def load_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True
) -> dict[str, Palette]:
    """Fill ``model`` (an instance of the saved architecture) in place from an artifact.

    Clustered weights become ``LUT[indices]`` cast to the model's dtype (bit for bit the
    finalized weights with an fp32 LUT; the fp16-rounded centroids with an fp16 LUT), every
    other tensor is copied as stored. Nothing is written into ``model`` unless the whole file
    is valid and matches it.

    Args:
        model: a plain (not parametrized) model of the saved architecture.
        path: the file written by :func:`save_compressed`; it may come from an untrusted source.
        strict: require the file's names and ``model.state_dict()`` to match exactly; with
            ``False`` only the common names are loaded (shapes must still match).

    Returns:
        The palettes of the loaded clustered tensors, on the model's device and in its dtype,
        with ``palette.weight()`` equal to the loaded weight.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable safetensors file, is of another format or
            version, fails its checksum, has an inconsistent layout, or does not fit ``model``
            (missing or unexpected names, another shape or dtype kind).
    """
    path = Path(path)
    metadata, tensors = _read(path)
    palettes, stored, aliases = _decode(path, metadata, tensors)

    target = model.state_dict()
    available = set(palettes) | set(stored) | set(aliases)
    wanted = {k for k, v in target.items() if isinstance(v, Tensor)}
    missing, unexpected = wanted - available, available - wanted
    if strict and (missing or unexpected):
        raise _fail(path, "does not match the model (another architecture?): "
                          f"missing from the file: [{_listing(missing)}]; "
                          f"not in the model: [{_listing(unexpected)}]")

    values: dict[str, Tensor] = {}
    cache: dict[str, Tensor] = {}
    for key in sorted(wanted & available):
        source = aliases.get(key, key)
        if source not in cache:
            cache[source] = palettes[source].weight() if source in palettes else stored[source]
        value = cache[source]
        if not _compatible(value, target[key]):
            raise _fail(path, f"{key!r} is {value.dtype} {tuple(value.shape)} in the file but "
                              f"{target[key].dtype} {tuple(target[key].shape)} in the model")
        values[key] = value

    for key, value in values.items():
        target[key].copy_(value)

    loaded = {}
    for name, palette in palettes.items():
        if name in values:
            weight = target[name]
            loaded[name] = Palette(
                lut=palette.lut.to(device=weight.device, dtype=weight.dtype),
                indices=palette.indices.to(weight.device),
                layout=palette.layout,
            )
    return loaded
