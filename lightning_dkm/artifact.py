"""The compressed artifact: one safetensors file holding a clustered model at its stored size.

Layout of the file (no pickle anywhere; ``safetensors`` parses it):

* ``lut/<name>``: the LUTs of clustered tensor ``<name>``, shape ``(P, 2**bits, cluster_dim)``,
  dtype float16 or float32 (a float16 file keeps the LUT of a tensor with a centroid beyond
  float16's range, ``|value| > 65504``, in float32 and records that in its layout entry);
* ``scale/<name>``: only for a tensor clustered with ``per_channel_scale``: its per-output-channel
  scales, shape ``(channels,)``, in the dtype of its LUT;
* ``indices/<name>``: its ``P * n`` palette indices (an index addresses one ``cluster_dim``-vector)
  bit-packed at exactly ``bits`` bits each (:mod:`lightning_dkm.bitpack`), a 1-D uint8 tensor;
* ``state/<name>``: every other tensor of ``model.state_dict()``, as it is; a tensor reachable
  under several names (tied weights) is stored once and the other names are recorded as aliases;
* string metadata: ``lightning_dkm.format`` (``"lightning_dkm.compressed"``),
  ``lightning_dkm.version`` (``"1"``), ``lightning_dkm.layout`` (JSON: per clustered tensor its
  shape, dtype, bits, cluster_dim, group_size, group_axis, vector_axis and index count, plus
  ``lut_dtype`` where its LUT is stored at another dtype than the file's and
  ``per_channel_scale: true`` where it has scales, and the aliases),
  ``lightning_dkm.sha256`` (a digest of every tensor and every other metadata entry), and any
  user metadata.

Files are written atomically (:func:`~lightning_dkm._files.write_atomically`): a temporary
file in the same directory, flushed to disk, then moved into place, so an interrupted save
leaves the previous file (or none), never a truncated one.

:func:`load_compressed` and :func:`read_palettes` treat the file as untrusted: they check the
format, the digest, the layout, every tensor's shape and byte length (and ``load_compressed``
the match with the target model), all before the first write into the model, and raise
``ValueError`` naming the file and what is wrong. The file's tensor data is exactly
:attr:`CompressionReport.total_bytes <lightning_dkm.report.CompressionReport>` bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._files import write_atomically
from ._state import StateTensors, is_compression_metadata, state_tensors, unwrap
from .bitpack import pack_bits, packed_size, unpack_bits
from .carried import carried_palettes, carry_palettes, discard_palettes
from .layout import ClusterSpec, PaletteLayout
from .packed import pack
from .palette import FLOAT16_MAX, Palette
from .report import CompressionReport

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "inspect_artifact",
    "load_compressed",
    "read_metadata",
    "read_palettes",
    "save_compressed",
]

FORMAT_NAME = "lightning_dkm.compressed"
FORMAT_VERSION = "1"

_PREFIX = "lightning_dkm."
_KEY_FORMAT = _PREFIX + "format"
_KEY_VERSION = _PREFIX + "version"
_KEY_LAYOUT = _PREFIX + "layout"
_KEY_DIGEST = _PREFIX + "sha256"

_LUT, _SCALE, _INDICES, _STATE = "lut/", "scale/", "indices/", "state/"
_LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
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


def _looks_clustered(tensor: Tensor) -> int | None:
    """The number of distinct values of ``tensor`` when it looks like a finalized (snapped)
    weight, else ``None``: a floating-point tensor of at least 2048 elements holding 2..256
    distinct values, which is what finalize leaves behind with one palette of at most 8 bits
    (a constant tensor, e.g. a zero-initialised layer, does not count)."""
    if not tensor.is_floating_point() or tensor.numel() < _LOOKS_CLUSTERED_MIN_SIZE:
        return None
    flat = tensor.detach().reshape(-1)
    if torch.unique(flat[:_LOOKS_CLUSTERED_PROBE]).numel() > _LOOKS_CLUSTERED_MAX_VALUES:
        return None  # the common case, a dense weight, without sorting the whole tensor
    distinct = int(torch.unique(flat).numel())
    return distinct if 2 <= distinct <= _LOOKS_CLUSTERED_MAX_VALUES else None


def _clustered_looking(state: StateTensors) -> dict[str, int]:
    """``{name: distinct values}`` of every Parameter of at least 2 dims (the tensors a layout
    can cluster) that :func:`_looks_clustered`."""
    found: dict[str, int] = {}
    for name, tensor in state.tensors.items():
        if name in state.parameters and tensor.dim() >= 2:
            distinct = _looks_clustered(tensor)
            if distinct is not None:
                found[name] = distinct
    return found


def _refuse_forgotten_palettes(state: StateTensors) -> None:
    """Empty ``palettes`` for a model that was clustered would silently store it dense."""
    found = _clustered_looking(state)
    if found:
        listing = ", ".join(f"{name} ({n} distinct values)" for name, n in list(found.items())[:10])
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        raise ValueError(
            f"palettes is empty, but these weights look clustered (parameters of >= "
            f"{_LOOKS_CLUSTERED_MIN_SIZE} elements with at most {_LOOKS_CLUSTERED_MAX_VALUES} "
            f"distinct values): {listing}{more}. Without their palettes they would be stored "
            "dense, at full size. Pass the palettes: DKMCallback.palettes after fit, or what "
            "finalize()/palettize() returned (read_palettes() reads them back from an artifact). "
            "To store these weights dense on purpose, pass allow_dense=True."
        )


def _checked_weight(name: str, palette: Palette, weight: Tensor | None) -> Tensor:
    """The model's tensor ``name``, which ``palette`` must describe exactly, with finite
    centroids."""
    if weight is None:
        raise ValueError(
            f"palette {name!r} has no tensor of that name in model.state_dict(); pass the "
            "finalized model (after finalize() or palettize()) and its palettes"
        )
    if not isinstance(palette, Palette):
        raise ValueError(
            f"palettes[{name!r}] must be a Palette (from finalize()/palettize()); got "
            f"{type(palette).__name__}"
        )
    if tuple(weight.shape) != palette.layout.shape:
        raise ValueError(
            f"palette {name!r} is for shape {palette.layout.shape}, but the model's {name!r} "
            f"has shape {tuple(weight.shape)}; pass the palettes that finalize()/palettize() "
            "returned for this model"
        )
    if not bool(torch.isfinite(palette.lut).all()):
        raise ValueError(
            f"palette {name!r} has NaN or Inf centroids (did training diverge?); a file holding "
            "them could not be loaded, so none is written. Check the loss and the weights of "
            f"{name!r}"
        )
    differ = palette.differing_elements(weight)
    if differ:
        raise ValueError(
            f"palette {name!r} does not reproduce the model's {name!r} ({differ} of "
            f"{weight.numel()} elements differ): the weight changed after finalize() (more "
            "training steps, or an in-place edit). Save the model as finalize()/palettize() left "
            "it, with the palettes that call returned, or run palettize() on the changed model"
        )
    return weight


def _stored_lut(name: str, palette: Palette, lut_dtype: torch.dtype) -> Tensor:
    """The LUT as the file stores it: at ``lut_dtype``, or at float32 (with a warning) where a
    centroid lies beyond float16's range and would otherwise be stored as ``inf``."""
    dtype = palette.stored_lut_dtype(lut_dtype)
    lut = palette.lut.detach().to("cpu")
    if dtype != lut_dtype and palette.max_abs_centroid() <= FLOAT16_MAX:
        warnings.warn(
            f"{name!r}: a per-channel scale is not exactly a float16 number (below float16's "
            "normal range), so this tensor's LUT and scales are stored in float32 to load back "
            "exactly; the compression report counts them so.",
            stacklevel=3,
        )
    elif dtype != lut_dtype:
        flat = lut.reshape(-1).float()
        value = float(flat[flat.abs().argmax()])
        warnings.warn(
            f"{name!r}: centroid {value:g} lies beyond the float16 range (|value| <= "
            f"{FLOAT16_MAX:g}); stored in float16 it would be inf and the file could not be "
            f"loaded. This tensor's LUT is stored in float32 instead ("
            f"{palette.lut_bytes(torch.float32)} bytes, not {palette.lut_bytes(lut_dtype)}; the "
            "compression report counts it so). To keep float16, keep the weights in range "
            "(e.g. weight decay); lut_dtype=torch.float32 stores every LUT in float32.",
            stacklevel=3,
        )
    return lut.to(dtype).contiguous()


def _clustered_entry(palette: Palette, weight: Tensor, stored: Tensor,
                     lut_dtype: torch.dtype) -> dict[str, Any]:
    """The layout entry of one clustered tensor (``lut_dtype`` only where it differs)."""
    layout, spec = palette.layout, palette.layout.spec
    entry: dict[str, Any] = {
        "shape": list(layout.shape),
        "dtype": _dtype_name(weight.dtype),
        "bits": spec.bits,
        "cluster_dim": spec.cluster_dim,
        "group_size": spec.group_size,
        "group_axis": layout.group_axis,
        "vector_axis": layout.vector_axis,
        "count": palette.num_indices,
    }
    if stored.dtype != lut_dtype:
        entry["lut_dtype"] = _dtype_name(stored.dtype)
    if spec.per_channel_scale:
        entry["per_channel_scale"] = True
    return entry


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    palettes: Mapping[str, Palette] | None = None,
    *,
    lut_dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
    allow_dense: bool = False,
) -> Path:
    """Write the finalized ``model`` as LUTs + bit-packed indices + its other tensors.

    The file is written atomically (:func:`~lightning_dkm._files.write_atomically`): an
    interrupted save leaves the previous file at ``path`` (or none), never a truncated one.

    Args:
        model: the model after :func:`~lightning_dkm.finalize` or
            :func:`~lightning_dkm.palettize`; each clustered weight must equal
            ``palettes[name].weight()``.
        path: the file to write (replaced atomically); its directory must exist.
        palettes: ``None`` (default): the palettes ``model`` carries (finalize, palettize and
            load_compressed record them on it, :mod:`lightning_dkm.carried`), checked against
            its weights. Or what ``finalize``/``palettize`` returned (``DKMCallback.palettes``
            after fit), each checked against its weight; tensors they leave out are stored
            dense (two callbacks on disjoint tensors each save their own).
            An empty mapping stores every tensor dense, which is allowed for a model with no
            weight that looks clustered (a Parameter of >= 2 dims and >= 2048 elements holding
            2..256 distinct values, as finalize leaves a per-tensor palette); for one that has
            such weights it is an error, since the palettes were most likely forgotten.
        lut_dtype: ``torch.float16`` (half the LUT bytes; the loaded weights are the
            fp16-rounded centroids) or ``torch.float32`` (loads bit for bit). With float16, a
            tensor with a centroid beyond float16's range (``|value| > 65504``) keeps its LUT in
            float32, with a warning, so the file loads back exactly.
        metadata: extra ``str -> str`` entries for the file header.
        allow_dense: with empty ``palettes``, store weights that look clustered dense anyway.

    Returns:
        The path written.

    Raises:
        ValueError: an unsupported ``lut_dtype``; empty ``palettes`` while weights look
            clustered (and not ``allow_dense``); a palette with no tensor of its name in
            ``model.state_dict()``, of another shape, with NaN/Inf centroids, or that differs
            from that tensor; non-tensor state (``get_extra_state``); or bad ``metadata``.
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    if lut_dtype not in _LUT_DTYPES.values():
        raise ValueError(f"lut_dtype must be one of {list(_LUT_DTYPES)}; got {lut_dtype}")
    model = unwrap(model)  # torch.compile / DDP: the names are the model's own
    if palettes is None:
        palettes = carried_palettes(model)
    elif not isinstance(palettes, Mapping):
        raise ValueError(
            f"palettes must be None (the palettes the model carries) or the mapping returned by "
            f"finalize()/palettize(); got {type(palettes).__name__}"
        )

    user_metadata = _check_user_metadata(metadata)
    state = state_tensors(model, preferred=palettes)
    if state.non_tensors:
        raise ValueError(
            f"state_dict entries that are not tensors cannot be stored without pickle: "
            f"{', '.join(state.non_tensors)}"
        )
    if not palettes and not allow_dense:
        _refuse_forgotten_palettes(state)

    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, palette in palettes.items():
        weight = _checked_weight(name, palette, state.tensors.get(name))
        lut = _stored_lut(name, palette, lut_dtype)
        tensors[_LUT + name] = lut
        if palette.scale is not None:
            tensors[_SCALE + name] = palette.scale.detach().cpu().to(lut.dtype).contiguous()
        tensors[_INDICES + name] = pack_bits(
            palette.indices.detach().cpu(), palette.layout.spec.bits
        )
        entries[name] = _clustered_entry(palette, weight, lut, lut_dtype)
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
            {"lut_dtype": _dtype_name(lut_dtype), "clustered": entries, "aliases": state.aliases,
             # which stored tensors are Parameters (the rest are buffers), for inspect_artifact
             "parameters": sorted(n for n in state.tensors if n in state.parameters)},
            sort_keys=True,
        ),
    }
    header[_KEY_DIGEST] = _digest(header, tensors)
    path = Path(path)
    write_atomically({path: lambda tmp: save_file(tensors, str(tmp), metadata=header)})
    return path


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


@torch.no_grad()
def load_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, packed: bool = False
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
        packed: keep the clustered weights packed (:func:`lightning_dkm.packed.pack`: LUT +
            bit-packed indices as buffers, decoded per forward) instead of dense: the model then
            holds about the artifact's bytes. Their dense values are never written. Build the
            model under ``torch.device("meta")`` to skip its own (dense, random)
            initialisation as well: tensors still on the meta device are assigned, on CPU.

    Returns:
        The palettes of the loaded clustered tensors, on the model's device and in its dtype,
        with ``palette.weight()`` equal to the loaded weight. The model carries them too
        (:mod:`lightning_dkm.carried`), replacing any palettes it carried before.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not a readable safetensors file, is of another format or
            version, fails its checksum, has an inconsistent layout, or does not fit ``model``
            (missing or unexpected names, another shape or dtype kind).
    """
    path = Path(path)
    metadata, tensors = _read(path)
    palettes, stored, aliases = _decode(path, metadata, tensors)

    target = model.state_dict()
    available = set(palettes) | set(stored) | set(aliases)
    wanted = {
        k for k, v in target.items() if isinstance(v, Tensor) and not is_compression_metadata(k)
    }
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
            if source in palettes and packed:  # never decoded: check its shape only
                cache[source] = torch.empty(palettes[source].layout.shape,
                                            dtype=target[key].dtype, device="meta")
            elif source in palettes:
                cache[source] = palettes[source].weight(target[key].dtype)
            else:
                cache[source] = stored[source]
        value = cache[source]
        if not _compatible(value, target[key]):
            raise _fail(path, f"{key!r} is {value.dtype} {tuple(value.shape)} in the file but "
                              f"{target[key].dtype} {tuple(target[key].shape)} in the model")
        values[key] = value

    clustered_keys = {k for k in values if aliases.get(k, k) in palettes}
    on_meta: dict[str, Tensor] = {}  # a model built under torch.device("meta"): assign, not copy
    for key, value in values.items():
        if packed and key in clustered_keys:
            continue
        if target[key].is_meta:
            on_meta[key] = value.to(target[key].dtype)
        else:
            target[key].copy_(value)
    if on_meta:
        model.load_state_dict(on_meta, strict=False, assign=True)
    discard_palettes(model)  # what the model carried before describes other weights

    target = model.state_dict()  # after an assign, the new tensors
    loaded = {}
    for name, palette in palettes.items():
        if name in values:
            weight = target[name]
            if weight.is_meta:  # packed: the weight stays unmaterialised, its palette on CPU
                weight = torch.empty(0, dtype=weight.dtype)
            loaded[name] = Palette(
                lut=palette.lut.to(device=weight.device, dtype=weight.dtype),
                indices=palette.indices.to(weight.device),
                layout=palette.layout,
                scale=None if palette.scale is None else palette.scale.to(
                    device=weight.device, dtype=weight.dtype),
            )
    if packed:
        pack(model, {k: v for k, v in loaded.items() if k not in aliases}, verify=False)
    else:
        carry_palettes(model, loaded)
    return loaded


def read_palettes(path: str | os.PathLike[str]) -> dict[str, Palette]:
    """The palettes (LUT + indices + layout) stored in an artifact, by parameter name, without
    a model: e.g. to restore ``DKMCallback.palettes`` in the process that launched a
    ``ddp_spawn`` fit, or to feed a packed-inference export.

    The file is validated as :func:`load_compressed` validates it (format, checksum, layout,
    shapes). Each palette's LUT is on CPU in its stored dtype (float16 or float32: the
    file's ``lut_dtype``, or float32 for a LUT kept in float32 for range), its indices int64;
    its layout equals the saved one. ``palette.weight()`` is therefore the weight
    :func:`load_compressed` loads, before the cast to the model's dtype
    (``palette.lut.to(dtype)`` for a palette in the model's dtype).

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not a readable safetensors file, is of another format or
            version, fails its checksum or has an inconsistent layout (naming the file and the
            entry).
    """
    path = Path(path)
    metadata, tensors = _read(path)
    palettes, _, _ = _decode(path, metadata, tensors)
    return palettes


def inspect_artifact(path: str | os.PathLike[str]) -> CompressionReport:
    """The :class:`~lightning_dkm.report.CompressionReport` of an artifact, from the file alone
    (no model, no training code): per clustered tensor its layout and stored bytes, every other
    tensor as stored, the totals. It is the report ``DKMCallback`` wrote, without the per-tensor
    statistics and the energy estimate (those need the training run and a forward pass).

    The file is validated as :func:`read_palettes` validates it. Files written before the
    ``parameters`` entry existed report every dense tensor as a buffer.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`read_palettes`.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    palettes, stored, aliases = _decode(path, metadata, tensors)
    data = json.loads(metadata[_KEY_LAYOUT])
    parameters = set(data.get("parameters", [])) | set(palettes)
    skeleton = nn.Module()
    values = {name: p.weight() for name, p in palettes.items()} | stored
    entries: dict[str, Tensor] = {}  # every stored tensor once, as a Parameter or a buffer
    for name, tensor in values.items():
        entries[name] = nn.Parameter(tensor, requires_grad=False) if name in parameters else tensor
    # an alias gets the very same object, so the report counts the tensor once
    for name in [*values, *aliases]:
        owner_name, _, leaf = name.rpartition(".")
        owner = skeleton
        for part in owner_name.split(".") if owner_name else []:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        entry = entries[aliases.get(name, name)]
        kind = owner._parameters if isinstance(entry, nn.Parameter) else owner._buffers
        kind[leaf] = entry
    lut_dtype = _LUT_DTYPES[data["lut_dtype"]]
    return CompressionReport.build(skeleton, palettes, lut_dtype=lut_dtype)
