"""The compressed artifact: one safetensors file holding a clustered model at its stored size.

The writer and the loader of the format are kept side by side, so that every check on load sits
next to the write it checks; the format's keys, digest and untrusted-file checks are in
:mod:`.artifact_format`.

Layout of the file (no pickle anywhere; ``safetensors`` parses it):

* ``lut/<name>``: the LUTs of clustered tensor ``<name>``, shape ``(P, 2**bits, cluster_dim)``,
  dtype float16 or float32 (a float16 file keeps a LUT that float16 cannot hold in float32,
  :func:`_stored_lut`, and records that in its layout entry);
* ``scale/<name>``: only for a tensor clustered with ``per_channel_scale``: its per-output-channel
  scales, shape ``(channels,)``, in the dtype of its LUT;
* ``indices/<name>``: its ``P * n`` palette indices (an index addresses one ``cluster_dim``-vector)
  bit-packed at exactly ``bits`` bits each (:mod:`lightning_dkm.engine.bitpack`), a 1-D uint8
  tensor;
* ``state/<name>``: every other tensor of ``model.state_dict()``, as it is; a tensor reachable
  under several names (tied weights) is stored once and the other names are recorded as aliases;
* string metadata: ``lightning_dkm.format`` (``"lightning_dkm.compressed"``),
  ``lightning_dkm.version`` (``"1"``), ``lightning_dkm.layout`` (JSON: per clustered tensor its
  shape, dtype, bits, cluster_dim, group_size, group_axis, vector_axis and index count, plus
  ``lut_dtype`` where its LUT is stored at another dtype than the file's and
  ``per_channel_scale: true`` where it has scales, the aliases, and the names of the stored
  tensors that are Parameters),
  ``lightning_dkm.sha256`` (a digest of every tensor and every other metadata entry), and any
  user metadata.

:func:`load_compressed`, :func:`read_palettes` and :func:`inspect_artifact` treat the file as
untrusted: they check the format, the digest, the layout (JSON of bounded depth and integer
length), every tensor's shape and byte length (and ``load_compressed`` every shape against the
target model), all before anything is decoded or written into the model, and raise
``ValueError`` naming the file and what is wrong. What they allocate is bounded by the file and,
when decoding, by the model: a layout cannot make them build a weight the model does not have.
The file's tensor data is exactly
:attr:`CompressionReport.total_bytes <lightning_dkm.export.report.CompressionReport>` bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..engine.bitpack import pack_bits
from ..engine.palette import (
    LutDtype,
    Palette,
    cast_overflow,
    cast_overflow_message,
    lut_dtype_of,
)
from ..model.carried import carried_palettes, carry_palettes, discard_palettes, palette_tensor
from ..model.state import StateTensors, is_compression_metadata, state_tensors, unwrap
from ..model.targets import DEFAULT_MIN_SIZE
from .artifact_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDICES,
    KEY_DIGEST,
    KEY_FORMAT,
    KEY_LAYOUT,
    KEY_VERSION,
    LUT,
    METADATA_PREFIX,
    SCALE,
    STATE,
    CheckedFile,
    ReportMismatchWarning,
    check_file,
    decode_palettes,
    digest,
    dtype_name,
    file_error,
    listed,
    read_metadata,
    report_mismatch,
)
from .files import safetensors_errors_as_os_errors, write_atomically
from .packed import is_packed, pack
from .report import CompressionReport, LayerReport, TensorReport

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ReportMismatchWarning",
    "inspect_artifact",
    "load_compressed",
    "read_metadata",
    "read_palettes",
    "save_compressed",
]

# -- saving ---------------------------------------------------------------------------------

_LOOKS_CLUSTERED_MAX_VALUES = 256  # what _looks_clustered allows
_LOOKS_CLUSTERED_PROBE = 4096  # more distinct values than this many leading elements: dense


def _check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"metadata must map str to str; got {key!r}: {type(value).__name__}"
            )
        if key.startswith(METADATA_PREFIX):
            raise ValueError(
                f"metadata key {key!r} is reserved (keys starting with {METADATA_PREFIX!r})"
            )
        out[key] = value
    return out


def _looks_clustered(tensor: Tensor) -> int | None:
    """The number of distinct values of ``tensor`` when it looks like a finalized weight, as
    :func:`save_compressed`'s ``palettes`` describes one (floating point, at least
    ``DEFAULT_MIN_SIZE`` elements, 2..256 distinct values), else ``None``."""
    if not tensor.is_floating_point() or tensor.numel() < DEFAULT_MIN_SIZE:
        return None
    flat = tensor.detach().reshape(-1)
    if torch.unique(flat[:_LOOKS_CLUSTERED_PROBE]).numel() > _LOOKS_CLUSTERED_MAX_VALUES:
        return None  # the common case, a dense weight, without sorting the whole tensor
    distinct = int(torch.unique(flat).numel())
    return distinct if 2 <= distinct <= _LOOKS_CLUSTERED_MAX_VALUES else None


def _refuse_forgotten_palettes(state: StateTensors) -> None:
    """Empty ``palettes`` for a model that was clustered would silently store it dense: an
    error listing every Parameter of at least 2 dims (the tensors a layout can cluster) that
    :func:`_looks_clustered`, with its number of distinct values."""
    found: dict[str, int] = {}
    for name, tensor in state.tensors.items():
        if name in state.parameters and tensor.dim() >= 2:
            distinct = _looks_clustered(tensor)
            if distinct is not None:
                found[name] = distinct
    if found:
        listing = listed([f"{name} ({n} distinct values)" for name, n in found.items()],
                         quote=False)
        raise ValueError(
            f"palettes is empty, but these weights look clustered (parameters of >= "
            f"{DEFAULT_MIN_SIZE} elements with at most {_LOOKS_CLUSTERED_MAX_VALUES} "
            f"distinct values): {listing}. Without their palettes they would be stored "
            "dense, at full size. Pass the palettes: DKMCallback.palettes after fit, or what "
            "finalize()/palettize() returned (read_palettes() reads them back from an artifact). "
            "To store these weights dense on purpose, pass allow_dense=True."
        )


def _checked_weight(name: str, palette: Palette, weight: Tensor | None) -> Tensor:
    """The model's tensor ``name``, which ``palette`` must describe exactly, with finite
    centroids."""
    if not isinstance(palette, Palette):
        raise ValueError(
            f"palettes[{name!r}] must be a Palette (from finalize()/palettize()); got "
            f"{type(palette).__name__}"
        )
    weight = palette_tensor(name, palette, weight)
    if not bool(torch.isfinite(palette.lut).all()):
        raise ValueError(
            f"palette {name!r} has NaN or Inf centroids (did training diverge?); a file holding "
            "them could not be loaded, so none is written. Check the loss and the weights of "
            f"{name!r}"
        )
    palette.check_reproduces(
        weight, name, "Save the model as finalize()/palettize() left it, with the palettes that "
        "call returned, or run palettize() on the changed model")
    return weight


def _stored_lut(name: str, palette: Palette, lut_dtype: torch.dtype) -> Tensor:
    """The LUT as the file stores it: at ``lut_dtype``, or at float32 (with a warning saying
    why) where float16 cannot hold it (:meth:`~lightning_dkm.engine.palette.Palette.
    float16_problem`: beyond its range, entirely below its normal range, or scales it cannot
    hold exactly)."""
    dtype = palette.stored_lut_dtype(lut_dtype)
    if dtype != lut_dtype:
        warnings.warn(
            f"{name!r}: {palette.float16_problem()}. This tensor's LUT (and scales) are stored "
            f"in float32 instead ({palette.lut_bytes(torch.float32)} LUT bytes, not "
            f"{palette.lut_bytes(lut_dtype)}; the compression report counts them so) and load "
            "back exactly; lut_dtype=torch.float32 stores every LUT in float32.",
            stacklevel=3,
        )
    return palette.lut.detach().to("cpu").to(dtype).contiguous()


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    palettes: Mapping[str, Palette] | None = None,
    *,
    lut_dtype: LutDtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
    allow_dense: bool = False,
) -> Path:
    """Write the finalized ``model`` as LUTs + bit-packed indices + its other tensors.

    The file is written atomically (:func:`~lightning_dkm.export.files.write_atomically`): an
    interrupted save leaves the previous file at ``path`` (or none), never a truncated one.

    Args:
        model: the model after :func:`~lightning_dkm.finalize` or
            :func:`~lightning_dkm.palettize`; each clustered weight must equal
            ``palettes[name].weight()``.
        path: the file to write, replaced atomically
            (:func:`~lightning_dkm.export.files.write_atomically`); its directory must exist.
        palettes: ``None`` (default): the palettes ``model`` carries (finalize, palettize and
            load_compressed record them on it, :mod:`lightning_dkm.model.carried`), checked against
            its weights. Or what ``finalize``/``palettize`` returned (``DKMCallback.palettes``
            after fit), each checked against its weight; tensors they leave out are stored
            dense (two callbacks on disjoint tensors each save their own).
            An empty mapping stores every tensor dense, which is allowed for a model with no
            weight that looks clustered (a floating-point Parameter of >= 2 dims and >= 2048
            elements holding 2..256 distinct values, as finalize leaves a per-tensor palette; a
            constant one does not count); for one that has such weights it is an error, since
            the palettes were most likely forgotten.
        lut_dtype: ``torch.float16`` (half the LUT bytes; the loaded weights are the
            fp16-rounded centroids) or ``torch.float32`` (loads bit for bit), or a name of
            one: ``"float16"`` / ``"fp16"`` / ``"half"``, ``"float32"`` / ``"fp32"`` /
            ``"float"`` (:func:`~lightning_dkm.engine.palette.lut_dtype_of`). With float16, a
            LUT float16 cannot hold stays float32, with a warning saying why, so the file loads
            back exactly.
        metadata: extra ``str -> str`` entries for the file header.
        allow_dense: with empty ``palettes``, store weights that look clustered dense anyway.

    Returns:
        The path written.

    Raises:
        ValueError: a packed model (:func:`~lightning_dkm.export.packed.pack`: unpack it
            first); an unsupported ``lut_dtype``; empty ``palettes`` while weights look
            clustered (and not ``allow_dense``); a palette with no tensor of its name in
            ``model.state_dict()``, of another shape, with NaN/Inf centroids, or that differs
            from that tensor; non-tensor state (``get_extra_state``); or bad ``metadata``.
        FileNotFoundError: the directory of ``path`` does not exist.
        OSError: the write failed (a full disk: ``errno.ENOSPC``, also when safetensors'
            writer reports it); the previous file at ``path`` is left as it was.
    """
    lut_dtype = lut_dtype_of(lut_dtype)
    model = unwrap(model)  # torch.compile / DDP: the names are the model's own
    if is_packed(model):
        raise ValueError(
            "the model is packed (pack() or load_compressed(..., packed=True)): its clustered "
            "weights are LUT and packed-index buffers, which would be stored dense under names "
            "no fresh instance of the model has. Call lightning_dkm.unpack(model) first"
        )
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
        tensors[LUT + name] = lut
        if palette.scale is not None:
            tensors[SCALE + name] = palette.scale.detach().cpu().to(lut.dtype).contiguous()
        tensors[INDICES + name] = pack_bits(
            palette.indices.detach().cpu(), palette.layout.spec.bits
        )
        entries[name] = {**palette.layout.to_dict(), "dtype": dtype_name(weight.dtype),
                         "count": palette.num_indices}
        if lut.dtype != lut_dtype:  # recorded only where it differs from the file's
            entries[name]["lut_dtype"] = dtype_name(lut.dtype)
    storages: set[tuple] = set()
    for name, t in state.tensors.items():
        if name in palettes:
            continue
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in storages:  # a partial view of a stored tensor: store a copy
            t = t.clone()
        storages.add(key)
        tensors[STATE + name] = t

    header = {
        **user_metadata,
        KEY_FORMAT: FORMAT_NAME,
        KEY_VERSION: FORMAT_VERSION,
        KEY_LAYOUT: json.dumps(
            {"lut_dtype": dtype_name(lut_dtype), "clustered": entries, "aliases": state.aliases,
             # which stored tensors are Parameters (the rest are buffers), for inspect_artifact
             "parameters": sorted(n for n in state.tensors if n in state.parameters)},
            sort_keys=True,
        ),
    }
    header[KEY_DIGEST] = digest(header, tensors)
    path = Path(path)
    with safetensors_errors_as_os_errors(path):
        write_atomically({path: lambda tmp: save_file(tensors, str(tmp), metadata=header)})
    return path


@torch.no_grad()
def load_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, packed: bool = False
) -> dict[str, Palette]:
    """Fill ``model`` (an instance of the saved architecture) in place from an artifact.

    Clustered weights become ``LUT[indices]`` (LUT and scales cast to the model's dtype: bit
    for bit the finalized weights with an fp32 LUT; the fp16-rounded centroids with an fp16
    LUT), every
    other tensor is copied as stored. Nothing is written into ``model`` unless the whole file
    is valid and matches it.

    Args:
        model: a plain (not parametrized) model of the saved architecture.
        path: the file written by :func:`save_compressed`; it may come from an untrusted source.
        strict: require the file's names and ``model.state_dict()`` to match exactly; with
            ``False`` only the common names are loaded (shapes must still match); a tied
            weight the model holds only under an alias the file records (the head of a tied
            embedding) is loaded with its palette under that name.
        packed: keep the clustered weights packed (:func:`lightning_dkm.export.packed.pack`: LUT +
            bit-packed indices as buffers, decoded per forward) instead of dense: the model then
            holds about the artifact's bytes. Their dense values are never written. Build the
            model under ``torch.device("meta")`` to skip its own (dense, random)
            initialisation as well: tensors still on the meta device are assigned, on CPU.

    Returns:
        The palettes of the loaded clustered tensors, on the model's device and in its dtype,
        with ``palette.weight()`` equal to the loaded weight. The model carries them too
        (:mod:`lightning_dkm.model.carried`), replacing any palettes it carried before.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the file may not be read (other ``OSError``s name the path too).
        ValueError: ``path`` is a FIFO, a device or a socket; the file is not a readable
            safetensors file, is of another format or version, fails its checksum, has an
            inconsistent layout, or does not fit ``model`` (missing or unexpected names,
            another shape or dtype kind: checked from the layout, before anything is decoded,
            so a file claiming larger tensors than the model has costs no more than reading it;
            a value the model's dtype cannot hold, e.g. a float32 LUT entry beyond float16's
            65504 for a ``.half()`` model, named before anything is loaded;
            names the model ties stored as separate tensors; with ``packed``, a tied clustered
            weight).

    Warns:
        ReportMismatchWarning: the ``compression_report.json`` beside the file records another
            artifact of its name (other bytes or SHA-256), naming both files.
    """
    path = Path(path)
    checked = check_file(path)
    _warn_if_report_mismatch(path, stacklevel=3)  # the caller, past torch.no_grad's wrapper
    layouts, stored, aliases = checked.layout.layouts, checked.state, checked.layout.aliases

    target = model.state_dict()
    available = set(layouts) | set(stored) | set(aliases)
    wanted = {
        k for k, v in target.items() if isinstance(v, Tensor) and not is_compression_metadata(k)
    }
    missing, unexpected = wanted - available, available - wanted
    if strict and (missing or unexpected):
        raise file_error(path, "does not match the model (another architecture?): "
                               f"missing from the file: {listed(missing, quote=False)}; "
                               f"not in the model: {listed(unexpected, quote=False)}")
    keys = sorted(wanted & available)
    _check_against_model(checked, keys, target)  # shapes from the layout: nothing decoded yet
    _check_ties(checked, keys, model, packed)

    sources = {aliases.get(key, key) for key in keys}
    palettes = decode_palettes(checked, [name for name in layouts if name in sources])
    # Every palette in the model's dtype, as it is returned, carried or packed below (LUT and
    # scales cast before they are multiplied), before anything is written: a value the
    # model's dtype cannot hold is an error here, never a silent inf in the model.
    in_dtype = _in_model_dtype(path, keys, aliases, palettes, stored, target)
    values: dict[str, Tensor] = {}
    cache: dict[str, Tensor] = {}
    for key in keys:
        source = aliases.get(key, key)
        if source in palettes and packed:
            continue  # never decoded: pack() below keeps LUT + indices
        if source not in cache:
            cache[source] = (in_dtype[source].weight() if source in palettes
                             else stored[source])
        values[key] = cache[source]

    on_meta: dict[str, Tensor] = {}  # a model built under torch.device("meta"): assign, not copy
    for key, value in values.items():
        if target[key].is_meta:
            on_meta[key] = value.to(target[key].dtype)
        else:
            target[key].copy_(value)
    if on_meta:
        model.load_state_dict(on_meta, strict=False, assign=True)
    discard_palettes(model)  # what the model carried before describes other weights

    target = model.state_dict()  # after an assign, the new tensors
    loaded = {}
    for source, name in _palette_homes(keys, aliases, palettes, wanted, target).items():
        weight = target[name]
        if weight.is_meta:  # packed: the weight stays unmaterialised, its palette on CPU
            weight = torch.empty(0, dtype=weight.dtype)
        palette = in_dtype[source].to(weight.device)
        if name != source:  # the tensor is here under an alias only: the palette follows it
            palette = dataclasses.replace(
                palette, layout=dataclasses.replace(palette.layout, name=name))
        loaded[name] = palette
    if packed:
        pack(model, loaded, verify=False)
    else:
        carry_palettes(model, loaded)
    return loaded


def _palette_homes(keys: list[str], aliases: dict[str, str], palettes: dict[str, Palette],
                   wanted: set[str], target: dict[str, Tensor]) -> dict[str, str]:
    """The model name each loaded palette (by the file's name) is returned, carried or packed
    under: the file's own name where the model has it; else, for a tied weight the file
    stores under a name the model lacks (``strict=False``: a model holding only the tied head
    of an embedding), the model's first name for it, in ``state_dict`` order, so that the
    palette follows the weight as it does with ``strict=True`` (and a packed load packs it
    rather than leaving the weight as it was)."""
    loaded = set(keys)
    homes = {source: source for source in palettes if source in wanted}
    for key in target:
        source = aliases.get(key, key)
        if key in loaded and source in palettes:
            homes.setdefault(source, key)
    return homes


def _in_model_dtype(path: Path, keys: list[str], aliases: dict[str, str],
                    palettes: dict[str, Palette], stored: dict[str, Tensor],
                    target: dict[str, Tensor]) -> dict[str, Palette]:
    """Each loaded palette cast to its model tensor's dtype (:meth:`Palette.to`), and every
    stored floating-point tensor checked against it; a value that dtype cannot hold (a float32
    LUT entry of 1e5 for a float16 model, whose range ends at 65504) is a ``ValueError`` naming
    the file, the tensor, the value and the range."""
    cast: dict[str, Palette] = {}
    for key in keys:
        source, dtype = aliases.get(key, key), target[key].dtype
        try:
            if source in palettes:
                if source not in cast:
                    cast[source] = palettes[source].to(dtype=dtype)
            elif (value := cast_overflow(stored[source], dtype)) is not None:
                raise ValueError(f"{key}: " + cast_overflow_message(
                    f"the file's {stored[source].dtype} tensor", value, dtype))
        except ValueError as err:
            raise file_error(path, f"cannot be loaded into this model (its {key!r} is "
                                   f"{dtype}); nothing was loaded: {err}") from None
    return cast


def _check_against_model(checked: CheckedFile, keys: list[str], target: dict[str, Tensor]
                         ) -> None:
    """Every loaded name's shape (a clustered tensor's from its layout) and dtype kind against
    the model's tensor, before anything is decoded: a file whose layout claims a larger tensor
    than the model has fails here, not after its weight was built."""
    layouts, aliases = checked.layout.layouts, checked.layout.aliases
    for key in keys:
        source = aliases.get(key, key)
        want = target[key]
        if source in layouts:
            shape, dtype = layouts[source].shape, f"torch.{checked.layout.dtypes[source]}"
            fits = shape == tuple(want.shape) and want.is_floating_point()
        else:
            value = checked.state[source]
            shape, dtype = tuple(value.shape), str(value.dtype)
            both_float = value.is_floating_point() and want.is_floating_point()
            fits = shape == tuple(want.shape) and (both_float or value.dtype == want.dtype)
        if not fits:
            raise file_error(checked.path, f"{key!r} is {dtype} {shape} in the file but "
                                           f"{want.dtype} {tuple(want.shape)} in the model")


def _check_ties(checked: CheckedFile, keys: list[str], model: nn.Module, packed: bool) -> None:
    """Names that are one tensor in ``model`` (tied weights) must be one tensor in the file (a
    name and its aliases): otherwise the second copy would silently overwrite the first. With
    ``packed``, a tied clustered weight is refused here, before anything is written, rather
    than by :func:`pack` after the dense tensors were."""
    layouts, aliases = checked.layout.layouts, checked.layout.aliases
    loaded = set(keys)
    tied: dict[str, list[str]] = {}  # the model's canonical name -> every name of its tensor
    for alias, canonical in state_tensors(model).aliases.items():
        tied.setdefault(canonical, [canonical]).append(alias)
    for group in tied.values():
        names = [name for name in group if name in loaded]
        sources = {aliases.get(name, name) for name in names}
        if len(sources) > 1:
            raise file_error(checked.path, f"the model ties {listed(names, quote=False)} (one "
                                           "tensor), but the file stores them as the separate "
                                           f"tensors {listed(sources, quote=False)}: it was saved "
                                           "from a model that does not tie them")
        if packed and len(group) > 1 and sources and sources <= set(layouts):
            raise file_error(checked.path, f"{listed(group, quote=False)} are one tied Parameter "
                                           "in the model; packing would untie them, so tied "
                                           "weights are not packed: load with packed=False")


def _warn_if_report_mismatch(path: Path, stacklevel: int) -> None:
    """Warn (at the caller ``stacklevel`` frames up) when the report beside ``path`` records
    another artifact of its name."""
    reason = report_mismatch(path)
    if reason is not None:
        warnings.warn(reason, ReportMismatchWarning, stacklevel=stacklevel + 1)


def read_palettes(path: str | os.PathLike[str]) -> dict[str, Palette]:
    """The palettes (LUT + indices + layout) stored in an artifact, by parameter name, without
    a model: e.g. to restore ``DKMCallback.palettes`` in the process that launched a
    ``ddp_spawn`` fit, or to feed a packed-inference export.

    The file is validated as :func:`load_compressed` validates it (format, checksum, layout,
    shapes). Each palette's LUT is on CPU in its stored dtype (float16 or float32: the
    file's ``lut_dtype``, or float32 for a LUT float16 cannot hold), its indices int64;
    its layout equals the saved one. ``palette.weight()`` is therefore the weight
    :func:`load_compressed` loads, before the cast to the model's dtype
    (``palette.lut.to(dtype)`` for a palette in the model's dtype).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, ValueError: as
            :func:`load_compressed`, for the file on its own (naming the file and the entry).
    """
    return decode_palettes(check_file(Path(path)))


def inspect_artifact(path: str | os.PathLike[str]) -> CompressionReport:
    """The :class:`~lightning_dkm.export.report.CompressionReport` of an artifact, from the file
    alone (no model, no training code): per clustered tensor its layout and stored bytes, every
    other tensor as stored, the totals. It is the report ``DKMCallback`` wrote, without the
    per-tensor statistics and the energy estimate (those need the training run and a forward
    pass).

    The file is validated as :func:`read_palettes` validates it, and nothing is decoded: the
    sizes come from the layout and the stored tensors, so the time and memory are those of
    reading the file, whatever its layout claims. When the ``compression_report.json``
    beside the file records another artifact of this file's name (other bytes or digest), a
    :class:`ReportMismatchWarning` says so, naming both files.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`read_palettes`.
    """
    path = Path(path)
    checked = check_file(path)
    _warn_if_report_mismatch(path, stacklevel=2)
    parsed, tensors = checked.layout, checked.tensors
    layers = []
    for name, layout in parsed.layouts.items():
        stored_dtype = parsed.lut_dtypes[name]
        scale = tensors.get(SCALE + name)
        layers.append(LayerReport.of(
            name, layout, getattr(torch, parsed.dtypes[name]), stored=stored_dtype,
            usual=parsed.lut_dtype,
            lut_bytes=tensors[LUT + name].numel() * stored_dtype.itemsize,
            index_bytes=tensors[INDICES + name].numel(),
            scale_bytes=0 if scale is None else scale.numel() * stored_dtype.itemsize,
        ))
    parameters = parsed.parameters | set(parsed.layouts)
    unclustered = [TensorReport.of(name, checked.state[name], name in parameters)
                   for name in _module_order([*parsed.layouts, *checked.state], parameters)
                   if name in checked.state]
    return CompressionReport(layers, unclustered, dtype_name(parsed.lut_dtype))


def _module_order(names: list[str], parameters: set[str] | frozenset[str]) -> list[str]:
    """``names`` in the order ``state_dict()`` lists them in the module tree they spell (a
    module's parameters, its buffers, then its submodules in order of first appearance), as the
    training run's report lists them; without building that tree of modules, so any names
    (``"a"`` and ``"a.b"``, ``"a..b"``) are fine and the cost is linear in their length."""
    # a node: (parameter names, buffer names, submodules by name)
    root: tuple[list[str], list[str], dict[str, tuple]] = ([], [], {})
    for name in names:
        node = root
        owner = name.rpartition(".")[0]
        for part in owner.split(".") if owner else ():
            node = node[2].setdefault(part, ([], [], {}))
        node[0 if name in parameters else 1].append(name)
    ordered: list[str] = []
    stack = [root]
    while stack:  # depth first, iteratively: a name may have any number of dots
        params, buffers, children = stack.pop()
        ordered += params + buffers
        stack.extend(reversed(children.values()))
    return ordered
