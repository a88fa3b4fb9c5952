"""What clustering bought: stored size per tensor and in total, and (optionally) an energy
estimate per inference.

Sizes are the sizes of the compressed artifact (:mod:`lightning_dkm.export.artifact`), byte for
byte:

* a clustered tensor stores its ``P`` LUTs of ``2**bits x cluster_dim`` entries at
  ``lut_dtype`` (at float32 where float16 cannot hold it, as the artifact stores it:
  :meth:`Palette.stored_lut_dtype <lightning_dkm.engine.palette.Palette.stored_lut_dtype>`), its
  per-channel scales (one per output channel, in the LUT's dtype) when it has
  ``per_channel_scale``, plus its ``P * n`` indices bit-packed at ``bits`` each over the whole
  tensor, ``ceil(P * n * bits / 8)`` bytes;
* every other tensor of ``model.state_dict()`` (parameters *and* buffers) is stored as it is, at
  its dtype's width; a tensor reachable under several names (tied weights) counts once.

The baselines store the same tensors densely: floating-point tensors at 4 bytes (fp32) or
2 bytes (fp16) per element, other tensors (e.g. ``num_batches_tracked``) at their own width.

The energy section is an estimate from :mod:`lightning_dkm.export.energy` (Horowitz, ISSCC
2014), never a measurement; every energy field name says ``estimated``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.layout import check_keys, is_int
from ..engine.palette import LutDtype, Palette, lut_dtype_of
from ..model.carried import palette_tensor
from ..model.state import split_name, state_tensors
from .energy import EnergyModel, count_macs
from .files import write_atomically
from .report_entries import (
    EnergyEstimate,
    LayerReport,
    TensorReport,
    _from_fields,
    _ratio,
    dtype_name,
)
from .report_render import render

__all__ = [
    "ARTIFACT_KEYS",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "STAT_KEYS",
    "CompressionReport",
    "EnergyEstimate",
    "LayerReport",
    "TensorReport",
    "artifact_entry",
]

#: The per-layer statistics ``CompressionReport.build(stats=...)`` accepts.
STAT_KEYS = ("entropy_bits", "snap_rmse")

_REPORT_FORMAT = "lightning_dkm.compression_report"
_REPORT_VERSION = 1

#: The file names :meth:`CompressionReport.save` writes into its directory.
REPORT_JSON = "compression_report.json"
REPORT_MARKDOWN = "compression_report.md"


def _check_stats(
    stats: Mapping[str, Mapping[str, float]] | None, names: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """``stats`` validated, as floats; a NaN statistic becomes ``None`` (unknown)."""
    if stats is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for name, values in stats.items():
        if name not in names:
            raise ValueError(
                f"stats has an entry for {name!r}, which is not a clustered tensor; clustered: "
                f"{', '.join(names) or '(none)'}"
            )
        check_keys(f"stats[{name!r}]", values, STAT_KEYS)
        try:
            numbers = {key: float(value) for key, value in values.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"stats[{name!r}] values must be numbers; got {values!r}") from err
        # NaN means unknown, as None does (both render as "-"); None also survives JSON.
        out[name] = {key: None if math.isnan(v) else v for key, v in numbers.items()}
    return out


#: The fields of the report's ``artifact`` entry: the artifact's file name (beside the report),
#: its size in bytes and the SHA-256 of its bytes (lowercase hex).
ARTIFACT_KEYS = ("file", "bytes", "sha256")


def artifact_entry(path: str | os.PathLike[str], file: str | None = None) -> dict[str, Any]:
    """The report's ``artifact`` entry for the artifact at ``path``: ``{"file": file (default:
    ``path``'s name), "bytes": its size, "sha256": the hex SHA-256 of its bytes}``, read in 1 MiB
    blocks. ``file`` names it where it will lie (the file read may be a staged copy)."""
    path = Path(path)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"file": file if file is not None else path.name, "bytes": size,
            "sha256": digest.hexdigest()}


def _artifact(data: object) -> dict[str, Any] | None:
    """The ``artifact`` entry read back: ``None`` or the three fields, checked."""
    if data is None:
        return None
    if not isinstance(data, Mapping) or set(data) != set(ARTIFACT_KEYS):
        raise ValueError(
            f"the compression report's 'artifact' must be null or an object with the fields "
            f"{list(ARTIFACT_KEYS)}; got {data!r}"
        )
    file, size, sha256 = data["file"], data["bytes"], data["sha256"]
    if not isinstance(file, str) or not file or "/" in file or "\\" in file:
        raise ValueError(
            f"the compression report's artifact.file must be a file name; got {file!r}")
    if not is_int(size, 0):
        raise ValueError(
            f"the compression report's artifact.bytes must be a size in bytes; got {size!r}")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(
            "the compression report's artifact.sha256 must be 64 lowercase hex digits; got "
            f"{sha256!r}")
    return {"file": file, "bytes": size, "sha256": sha256}


def _exports(data: object) -> dict[str, dict[str, Any]]:
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise ValueError("the compression report's 'exports' must map a target to an object")
    return {str(name): dict(entry) for name, entry in data.items()}


@dataclass
class CompressionReport:
    """Stored size of a clustered model, per clustered tensor and in total.

    Build it with :meth:`build`; render it with :meth:`to_table` / :meth:`to_markdown`; persist
    it with :meth:`to_dict` (JSON-able) / :meth:`save`, and read it back with :meth:`from_dict`
    / :meth:`load`.
    """

    layers: list[LayerReport]
    unclustered: list[TensorReport]
    lut_dtype: str = "float16"
    energy: EnergyEstimate | None = None
    #: What each export wrote and how it was verified, by target (``"coreml"``, ``"coreai"``):
    #: path, package bytes and, for Core AI, the runtime-vs-PyTorch difference.
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The artifact this report describes, beside it (:func:`artifact_entry`); ``None`` when no
    #: artifact was written with it. ``DKMCallback`` sets it when it writes the artifact.
    artifact: dict[str, Any] | None = None
    #: With ``DKMCallback(average_bits=...)``: the widths chosen and why
    #: (:meth:`BitAllocation.to_dict <lightning_dkm.model.bit_budget.BitAllocation.to_dict>`:
    #: the budget, and per tensor its width, bytes and the estimate at every width); ``None``
    #: otherwise.
    bit_allocation: dict[str, Any] | None = None

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        palettes: Mapping[str, Palette],
        *,
        lut_dtype: LutDtype = torch.float16,
        stats: Mapping[str, Mapping[str, float]] | None = None,
        example_input: Any = None,
        macs: Mapping[str, int] | None = None,
        energy_model: EnergyModel | None = None,
    ) -> CompressionReport:
        """Account for every tensor of a finalized ``model``.

        Args:
            model: the model after :func:`~lightning_dkm.finalize` or
                :func:`~lightning_dkm.palettize` (plain, no parametrizations).
            palettes: what ``finalize``/``palettize`` returned, by parameter name.
            lut_dtype: the LUT storage dtype, as
                :func:`~lightning_dkm.export.artifact.save_compressed`'s.
            stats: optional ``{name: {"entropy_bits": ..., "snap_rmse": ...}}`` per clustered
                tensor.
            example_input: if given, one forward pass counts MACs (:func:`count_macs`) and the
                report gets an energy estimate.
            macs: ``{module name: MACs}`` counted beforehand, instead of ``example_input``.
            energy_model: the per-operation energies (default: Horowitz, ISSCC 2014).

        Raises:
            ValueError: an unsupported ``lut_dtype``, a palette with no matching tensor in
                ``model.state_dict()`` or of another shape, malformed ``stats``, or both
                ``example_input`` and ``macs``.
        """
        lut_dtype = lut_dtype_of(lut_dtype)
        if example_input is not None and macs is not None:
            raise ValueError("pass example_input or macs, not both")
        names = list(palettes)
        checked_stats = _check_stats(stats, names)
        state = state_tensors(model, preferred=names)
        for name, palette in palettes.items():
            palette_tensor(name, palette, state.tensors.get(name))
        if example_input is not None:
            macs = count_macs(model, example_input)
        em = energy_model or EnergyModel()
        # As the artifact stores them (module docstring).
        stored = {name: p.stored_lut_dtype(lut_dtype) for name, p in palettes.items()}
        lookup_uj = {  # resolving every index once per inference
            name: em.lookup_uj(p.num_indices, p.layout.spec.cluster_dim * stored[name].itemsize)
            for name, p in palettes.items()
        }

        layers = []
        for name, palette in palettes.items():
            layer = LayerReport.of(
                name, palette.layout, state.tensors[name].dtype, stored=stored[name],
                usual=lut_dtype, lut_bytes=palette.lut_bytes(stored[name]),
                index_bytes=palette.index_bytes(), scale_bytes=palette.scale_bytes(stored[name]),
                **checked_stats.get(name, {}),
            )
            if macs is not None:
                layer.macs = int(macs.get(split_name(name)[0], 0))
                layer.estimated_fetch_energy_fp32_uj = em.fetch_uj(layer.fp32_bytes)
                layer.estimated_fetch_energy_compressed_uj = (
                    em.fetch_uj(layer.compressed_bytes) + lookup_uj[name]
                )
            layers.append(layer)

        unclustered = [TensorReport.of(name, t, name in state.parameters)
                       for name, t in state.tensors.items() if name not in palettes]
        report = cls(layers, unclustered, dtype_name(lut_dtype))
        if macs is not None:
            total_macs = int(sum(macs.values()))
            report.energy = EnergyEstimate(
                dram_read_pj=em.dram_read_pj,
                sram_read_pj=em.sram_read_pj,
                mac_pj=em.mac_pj,
                macs=total_macs,
                estimated_fetch_energy_fp32_uj=em.fetch_uj(report.fp32_bytes),
                estimated_fetch_energy_compressed_uj=em.fetch_uj(report.total_bytes),
                estimated_lut_lookup_energy_uj=sum(lookup_uj.values()),
                estimated_compute_energy_uj=em.compute_uj(total_macs),
            )
        return report

    # -- totals ------------------------------------------------------------------------------
    @property
    def clustered_bytes(self) -> int:
        return sum(layer.compressed_bytes for layer in self.layers)

    @property
    def unclustered_bytes(self) -> int:
        return sum(t.bytes for t in self.unclustered)

    @property
    def total_bytes(self) -> int:
        """Stored size of the whole model: the artifact's tensor data, in bytes."""
        return self.clustered_bytes + self.unclustered_bytes

    @property
    def fp32_bytes(self) -> int:
        return sum(layer.fp32_bytes for layer in self.layers) + sum(
            t.fp32_bytes for t in self.unclustered
        )

    @property
    def fp16_bytes(self) -> int:
        return sum(layer.parameters * 2 for layer in self.layers) + sum(
            t.fp16_bytes for t in self.unclustered
        )

    @property
    def ratio_vs_fp32(self) -> float:
        return _ratio(self.fp32_bytes, self.total_bytes)

    @property
    def ratio_vs_fp16(self) -> float:
        return _ratio(self.fp16_bytes, self.total_bytes)

    @property
    def clustered_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    def totals(self) -> dict[str, Any]:
        """The model-level numbers, as JSON-able primitives."""
        return {
            "clustered_tensors": len(self.layers),
            "unclustered_tensors": len(self.unclustered),
            "clustered_parameters": self.clustered_parameters,
            "clustered_bytes": self.clustered_bytes,
            "unclustered_bytes": self.unclustered_bytes,
            "total_bytes": self.total_bytes,
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "ratio_vs_fp32": self.ratio_vs_fp32,
            "ratio_vs_fp16": self.ratio_vs_fp16,
        }

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able primitives: format/version, ``lut_dtype``, ``layers``, ``unclustered``,
        ``totals``, ``estimated_energy`` (``None`` without an energy estimate), ``exports``,
        ``artifact`` (``None`` without an artifact) and ``bit_allocation`` (``None`` without
        ``average_bits``)."""
        return {
            "format": _REPORT_FORMAT,
            "version": _REPORT_VERSION,
            "lut_dtype": self.lut_dtype,
            "layers": [layer.to_dict() for layer in self.layers],
            "unclustered": [t.to_dict() for t in self.unclustered],
            "totals": self.totals(),
            "estimated_energy": self.energy.to_dict() if self.energy else None,
            "exports": {name: dict(entry) for name, entry in self.exports.items()},
            "artifact": dict(self.artifact) if self.artifact is not None else None,
            "bit_allocation": self.bit_allocation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionReport:
        """The inverse of :meth:`to_dict` (derived fields are derived again, not read).

        Raises:
            ValueError: ``data`` is not a report of this format and version, or lacks an entry
                or a field (naming it).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a compression report must be a JSON object; got {type(data)}")
        if data.get("format") != _REPORT_FORMAT or data.get("version") != _REPORT_VERSION:
            raise ValueError(
                f"not a compression report of format {_REPORT_FORMAT!r} version "
                f"{_REPORT_VERSION}; got format={data.get('format')!r}, "
                f"version={data.get('version')!r}"
            )
        absent = [key for key in ("layers", "unclustered", "lut_dtype") if key not in data]
        if absent:
            raise ValueError(f"the compression report lacks the entries {absent}")
        energy = data.get("estimated_energy")
        return cls(
            layers=[_from_fields(LayerReport, d) for d in data["layers"]],
            unclustered=[_from_fields(TensorReport, d) for d in data["unclustered"]],
            lut_dtype=data["lut_dtype"],
            energy=_from_fields(EnergyEstimate, energy) if energy else None,
            exports=_exports(data.get("exports", {})),
            artifact=_artifact(data.get("artifact")),
            bit_allocation=data.get("bit_allocation"),
        )

    def files(self, directory: str | Path) -> dict[Path, str]:
        """What :meth:`save` writes: ``{directory / compression_report.json: its JSON,
        directory / compression_report.md: its Markdown}`` (for writing them together with
        other files, :class:`~lightning_dkm.export.files.FileGroup`)."""
        directory = Path(directory)
        return {
            directory / REPORT_JSON: json.dumps(self.to_dict(), indent=2) + "\n",
            directory / REPORT_MARKDOWN: self.to_markdown(),
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``compression_report.json`` and ``compression_report.md`` (UTF-8) into
        ``directory`` (created if needed); returns ``{"json": path, "markdown": path}``.

        Both are written atomically (:func:`~lightning_dkm.export.files.write_atomically`): an
        interrupted save leaves the previous files (or none), never a truncated one.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically({
            path: lambda tmp, text=text: tmp.write_text(text, encoding="utf-8")
            for path, text in self.files(directory).items()
        })
        return {"json": directory / REPORT_JSON, "markdown": directory / REPORT_MARKDOWN}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionReport:
        """Read a report back from the JSON :meth:`save` wrote: ``path`` is that file or the
        directory it was saved into. After ``report.save(d)``, ``CompressionReport.load(d) ==
        report``.

        Raises:
            FileNotFoundError: no such file (or no ``compression_report.json`` in the directory).
            ValueError: the file is not JSON or not a compression report (naming the file and
                what is wrong).
        """
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"no compression report at {path}; pass the {REPORT_JSON} that "
                "CompressionReport.save() wrote, or its directory"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path}: not valid JSON ({err}); is it truncated? Save the report again"
            ) from err
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def record_export(self, target: str, entry: Mapping[str, Any]) -> None:
        """Add (or replace) what the export to ``target`` wrote and measured."""
        self.exports[target] = dict(entry)

    # -- rendering (report_render.py) ----------------------------------------------------------
    def to_table(self) -> str:
        """An aligned plain-text table: one row per clustered tensor, then the totals (and the
        energy estimate, if any)."""
        return render(self, markdown=False)

    def to_markdown(self) -> str:
        """The report as Markdown: a table with one row per clustered tensor, the totals, and
        the energy estimate (if any)."""
        return render(self, markdown=True)
