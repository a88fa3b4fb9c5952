"""The rows of a compression report: one clustered tensor (:class:`LayerReport`), one stored
unclustered tensor (:class:`TensorReport`) and the energy estimate (:class:`EnergyEstimate`),
each a dataclass of primitives that round-trips through JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch

from ..engine.layout import PaletteLayout

__all__ = ["EnergyEstimate", "LayerReport", "TensorReport", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    """How the report and the artifact name a dtype: ``"float16"`` for ``torch.float16``."""
    return str(dtype).removeprefix("torch.")


def _ratio(baseline: float, stored: float) -> float:
    return baseline / stored if stored else 1.0


def _to_dict(row: Any, **derived: Any) -> dict[str, Any]:
    """The dataclass ``row`` as JSON-ready primitives (a ``shape`` as a list), plus its
    ``derived`` values; :func:`_from_fields` reads it back."""
    out = asdict(row)
    if "shape" in out:
        out["shape"] = list(out["shape"])
    return {**out, **derived}


def _from_fields(cls: type, data: Any) -> Any:
    """Build dataclass ``cls`` from ``data``, ignoring derived keys that ``to_dict`` adds."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a {cls.__name__} entry must be a JSON object; got {data!r}")
    required = [f.name for f in fields(cls) if f.default is MISSING]
    absent = [name for name in required if name not in data]
    if absent:
        raise ValueError(f"a {cls.__name__} entry lacks the fields {absent}; got {sorted(data)}")
    kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    if "shape" in kwargs:
        kwargs["shape"] = tuple(kwargs["shape"])
    return cls(**kwargs)


@dataclass
class LayerReport:
    """One clustered tensor: its spec, its stored size, and optional training statistics.

    ``entropy_bits`` (the final DKM assignment entropy) and ``snap_rmse`` (RMS distance between
    the trained and the snapped weight) are ``None`` when unknown. ``macs`` and the
    ``estimated_*`` energies are those of the owning module and ``None`` without an energy
    estimate. ``lut_dtype`` is ``None`` when the LUT is stored at the report's ``lut_dtype``,
    and ``"float32"`` for a LUT that a float16 artifact keeps in float32 because float16 cannot
    hold it (``lut_bytes`` counts it so). ``scale_bytes`` counts the per-channel scales (0
    without ``per_channel_scale``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int
    cluster_dim: int
    group_size: int | None
    palettes: int
    parameters: int
    lut_bytes: int
    index_bytes: int
    scale_bytes: int = 0
    entropy_bits: float | None = None
    snap_rmse: float | None = None
    macs: int | None = None
    estimated_fetch_energy_fp32_uj: float | None = None
    estimated_fetch_energy_compressed_uj: float | None = None
    lut_dtype: str | None = None

    @classmethod
    def of(cls, name: str, layout: PaletteLayout, dtype: torch.dtype, *, stored: torch.dtype,
           usual: torch.dtype, lut_bytes: int, index_bytes: int, scale_bytes: int,
           **stats: float | None) -> LayerReport:
        """The row of the tensor ``name`` (of ``dtype``) clustered as ``layout``, its LUT stored
        at ``stored`` in a report whose LUTs are at ``usual``."""
        spec = layout.spec
        return cls(
            name=name, shape=layout.shape, dtype=dtype_name(dtype), bits=spec.bits,
            cluster_dim=spec.cluster_dim, group_size=spec.group_size,
            palettes=layout.num_palettes, parameters=layout.numel, lut_bytes=lut_bytes,
            index_bytes=index_bytes, scale_bytes=scale_bytes,
            lut_dtype=None if stored == usual else dtype_name(stored), **stats,
        )

    @property
    def compressed_bytes(self) -> int:
        return self.lut_bytes + self.scale_bytes + self.index_bytes

    @property
    def fp32_bytes(self) -> int:
        return self.parameters * 4

    @property
    def ratio_vs_fp32(self) -> float:
        return _ratio(self.fp32_bytes, self.compressed_bytes)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per scalar weight, LUT included."""
        return self.compressed_bytes * 8 / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(
            self,
            compressed_bytes=self.compressed_bytes,
            fp32_bytes=self.fp32_bytes,
            ratio_vs_fp32=self.ratio_vs_fp32,
            bits_per_weight=self.bits_per_weight,
        )


@dataclass
class TensorReport:
    """One tensor kept as it is (a parameter or a buffer), counted at its dtype's width."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" or "buffer"
    numel: int
    bytes: int
    floating: bool

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, parameter: bool) -> TensorReport:
        """The row of ``tensor``, stored as it is under ``name``."""
        return cls(name=name, shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype),
                   kind="parameter" if parameter else "buffer", numel=tensor.numel(),
                   bytes=tensor.numel() * tensor.element_size(),
                   floating=tensor.is_floating_point())

    @property
    def fp32_bytes(self) -> int:
        return self.numel * 4 if self.floating else self.bytes

    @property
    def fp16_bytes(self) -> int:
        return self.numel * 2 if self.floating else self.bytes

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self, fp32_bytes=self.fp32_bytes, fp16_bytes=self.fp16_bytes)


@dataclass
class EnergyEstimate:
    """Estimated energy of one inference (see :mod:`lightning_dkm.export.energy`); not a
    measurement.

    ``fetch`` is DRAM traffic for every stored tensor, ``lut_lookup`` the SRAM reads that
    resolve palette indices, ``compute`` the MACs (the same for both models).
    """

    dram_read_pj: float
    sram_read_pj: float
    mac_pj: float
    macs: int
    estimated_fetch_energy_fp32_uj: float
    estimated_fetch_energy_compressed_uj: float
    estimated_lut_lookup_energy_uj: float
    estimated_compute_energy_uj: float

    @property
    def estimated_total_energy_fp32_uj(self) -> float:
        return self.estimated_fetch_energy_fp32_uj + self.estimated_compute_energy_uj

    @property
    def estimated_total_energy_compressed_uj(self) -> float:
        return (
            self.estimated_fetch_energy_compressed_uj
            + self.estimated_lut_lookup_energy_uj
            + self.estimated_compute_energy_uj
        )

    @property
    def estimated_energy_ratio(self) -> float:
        """fp32 / compressed: how many times less energy the clustered model is estimated to
        use."""
        return _ratio(self.estimated_total_energy_fp32_uj,
                      self.estimated_total_energy_compressed_uj)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(
            self,
            estimated_total_energy_fp32_uj=self.estimated_total_energy_fp32_uj,
            estimated_total_energy_compressed_uj=self.estimated_total_energy_compressed_uj,
            estimated_energy_ratio=self.estimated_energy_ratio,
            source="Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm); an estimate",
        )
