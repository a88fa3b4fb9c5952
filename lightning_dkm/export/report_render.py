"""The compression report rendered for people: an aligned text table (printed at fit end) or
Markdown (``compression_report.md``, TensorBoard text). One list of sections, two table styles."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..model.bit_budget import BitAllocation

if TYPE_CHECKING:  # for annotations only: report.py imports this module
    from .report import CompressionReport
    from .report_entries import EnergyEstimate

__all__ = ["ENERGY_SKIPPED", "export_line", "render"]

#: What the rendered report says in place of the energy estimate when it has none.
ENERGY_SKIPPED = (
    "Energy estimate: skipped (no example input to count MACs with: set the LightningModule's "
    "example_input_array, or pass example_input= to CompressionReport.build)"
)

_LAYER_HEADERS = [
    "tensor", "shape", "bits", "dim", "group", "P", "params", "fp32 B", "stored B", "ratio",
    "bits/w", "entropy", "snap RMSE",
]
_TOTAL_HEADERS = ["totals", "", "bytes"]
_ENERGY_HEADERS = ["", "fp32 (est.)", "clustered (est.)"]


def render(report: CompressionReport, markdown: bool) -> str:
    """The report as Markdown (``markdown=True``: headings and pipe tables) or as aligned text:
    the clustered tensors, the totals, notes on LUT dtypes, and the energy estimate or why
    there is none."""
    table = _markdown_table if markdown else _text_table
    parts = ["# Compression report", "", "## Clustered tensors", ""] if markdown else []
    parts += [table(_LAYER_HEADERS, _layer_rows(report)), ""]
    parts += ["## Totals", ""] if markdown else []
    parts.append(table(_TOTAL_HEADERS, _total_rows(report)))
    notes = _notes(report)
    if notes:
        parts += ["", *notes]
    if report.energy is None:
        parts += ["", ENERGY_SKIPPED]
    else:
        parts += ["", "## Estimated energy per inference", ""] if markdown else [""]
        parts += [_energy_heading(report.energy), *([""] if markdown else []),
                  table(_ENERGY_HEADERS, _energy_rows(report.energy))]
    if report.bit_allocation is not None:
        parts += ["", "## Bit allocation (average_bits)", ""] if markdown else [""]
        parts.append(BitAllocation.from_dict(report.bit_allocation).to_markdown().rstrip())
    if report.exports:
        parts += ["", "## Exports", ""] if markdown else [""]
        parts += [("- " if markdown else "") + export_line(name, entry)
                  for name, entry in report.exports.items()]
    return "\n".join(parts) + "\n"


def export_line(target: str, entry: dict) -> str:
    """One export: where, how large, and how it was verified."""
    line = f"{target}: {entry.get('path')} ({entry.get('package_bytes', 0):,} bytes"
    if "lut_ops" in entry:
        line += f", {entry['lut_ops']} LUT ops"
    line += ")"
    difference = entry.get("max_abs_difference")
    if isinstance(difference, float) and not math.isnan(difference):
        line += (f"; ran in the runtime: max |runtime - PyTorch| = {difference:.3g} "
                 f"(allowed {entry.get('tolerance', math.nan):.3g})")
    elif "verified" in entry:
        line += f"; {entry['verified']}"
    return line


def _layer_rows(report: CompressionReport) -> list[list[str]]:
    return [
        [
            layer.name,
            "x".join(map(str, layer.shape)),
            str(layer.bits),
            str(layer.cluster_dim),
            "-" if layer.group_size is None else str(layer.group_size),
            str(layer.palettes),
            f"{layer.parameters:,}",
            f"{layer.fp32_bytes:,}",
            f"{layer.compressed_bytes:,}",
            f"{layer.ratio_vs_fp32:.2f}x",
            f"{layer.bits_per_weight:.3f}",
            _optional(layer.entropy_bits, ".3f"),
            _optional(layer.snap_rmse, ".3g"),
        ]
        for layer in report.layers
    ]


def _total_rows(report: CompressionReport) -> list[list[str]]:
    r = report
    return [
        ["clustered tensors", f"{len(r.layers)} ({r.clustered_parameters:,} params)",
         f"{r.clustered_bytes:,} B"],
        ["unclustered tensors", f"{len(r.unclustered)} (kept as stored)",
         f"{r.unclustered_bytes:,} B"],
        [f"total (LUT {r.lut_dtype})", "", f"{r.total_bytes:,} B"],
        ["fp32 model", f"{r.ratio_vs_fp32:.2f}x smaller", f"{r.fp32_bytes:,} B"],
        ["fp16 model", f"{r.ratio_vs_fp16:.2f}x smaller", f"{r.fp16_bytes:,} B"],
    ]


def _notes(report: CompressionReport) -> list[str]:
    """One line per LUT dtype other than the report's (LUTs float16 cannot hold)."""
    by_dtype: dict[str, list[str]] = {}
    for layer in report.layers:
        if layer.lut_dtype is not None and layer.lut_dtype != report.lut_dtype:
            by_dtype.setdefault(layer.lut_dtype, []).append(layer.name)
    return [
        f"LUT stored in {dtype}, not {report.lut_dtype} (values {report.lut_dtype} cannot "
        f"hold: beyond its range or below its normal range): {', '.join(names)}"
        for dtype, names in by_dtype.items()
    ]


def _energy_rows(e: EnergyEstimate) -> list[list[str]]:
    return [
        ["MACs per inference", f"{e.macs:,}", f"{e.macs:,}"],
        ["weight fetch (DRAM)", f"{e.estimated_fetch_energy_fp32_uj:.4g}",
         f"{e.estimated_fetch_energy_compressed_uj:.4g}"],
        ["LUT lookups (SRAM)", "0", f"{e.estimated_lut_lookup_energy_uj:.4g}"],
        ["compute (MACs)", f"{e.estimated_compute_energy_uj:.4g}",
         f"{e.estimated_compute_energy_uj:.4g}"],
        ["total", f"{e.estimated_total_energy_fp32_uj:.4g}",
         f"{e.estimated_total_energy_compressed_uj:.4g}"],
        ["ratio", "", f"{e.estimated_energy_ratio:.2f}x less"],
    ]


def _energy_heading(e: EnergyEstimate) -> str:
    return (
        "ESTIMATED energy per inference in µJ (an estimate, not a measurement; Horowitz, "
        f"ISSCC 2014, 45 nm: DRAM {e.dram_read_pj:g} pJ and SRAM {e.sram_read_pj:g} pJ per "
        f"32-bit read, {e.mac_pj:g} pJ per MAC; weights fetched once per inference)"
    )


def _optional(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "| " + " | ".join([":---"] + ["---:"] * (len(headers) - 1)) + " |"
    return "\n".join([line(headers), align, *(line(r) for r in rows)])
