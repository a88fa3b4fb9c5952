"""The finalized form of a clustered tensor: a look-up table (LUT) plus integer indices.

Per palette ``p`` the LUT holds ``k = 2**bits`` centroids of length ``cluster_dim`` and every
d-vector of the weight is stored as an index into it. ``Palette.weight()`` rebuilds the dense
weight as ``LUT[indices]`` laid back into the tensor's shape (times each output channel's scale
when the spec has ``per_channel_scale``); it is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .bitpack import packed_size
from .layout import PaletteLayout

__all__ = [
    "FLOAT16_MAX",
    "FLOAT16_TINY",
    "LUT_DTYPES",
    "LUT_DTYPE_VALUES",
    "LutDtype",
    "Palette",
    "cast_overflow",
    "cast_overflow_message",
    "lut_dtype_name",
    "lut_dtype_of",
    "stored_bytes",
]

#: The largest finite float16 (65504). A centroid beyond it would be stored as ``inf`` in a
#: float16 LUT, so such a LUT is stored in float32 instead (see :meth:`Palette.stored_lut_dtype`).
FLOAT16_MAX = torch.finfo(torch.float16).max
#: The smallest normal float16 (6.1e-5). A palette whose every centroid lies below it would be
#: stored as float16 subnormals (or 0), so such a LUT is stored in float32 instead.
FLOAT16_TINY = torch.finfo(torch.float16).tiny

def cast_overflow(values: Tensor, dtype: torch.dtype) -> float | None:
    """The finite value of ``values`` of largest magnitude that ``dtype`` cannot hold (cast to
    ``dtype`` it would become ``inf``: beyond ``torch.finfo(dtype).max``, e.g. 65504 for
    float16), or ``None`` when every finite value fits, or when ``dtype`` or ``values`` is not
    floating point (nothing to round)."""
    if not (dtype.is_floating_point and values.is_floating_point()):
        return None
    if torch.finfo(dtype).max >= torch.finfo(values.dtype).max:
        return None  # a dtype of at least the same range: nothing can overflow
    values = values.detach()
    bad = torch.isinf(values.to(dtype)) & torch.isfinite(values)
    if not bool(bad.any()):
        return None
    beyond = values[bad]
    return float(beyond[beyond.abs().argmax()])


def cast_overflow_message(what: str, value: float, dtype: torch.dtype) -> str:
    """The error for :func:`cast_overflow`'s ``value`` in ``what``: the value, the range of
    ``dtype`` and the fix."""
    return (f"{what} holds {value:g}, beyond the range of {dtype} (|value| <= "
            f"{torch.finfo(dtype).max:g}): cast to {dtype} it would become inf. Use a dtype "
            "whose range holds it (torch.float32; torch.bfloat16 reaches 3.4e38)")


# -- lut_dtype: the one place its values are read -------------------------------------------------
#: The dtypes a LUT is stored at, by the name an artifact records (``torch.float16`` without
#: its ``torch.`` prefix).
LUT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
#: Every value a ``lut_dtype`` argument accepts, and the dtype it means: the names above, the
#: short names ``"fp16"`` / ``"fp32"``, torch's own aliases ``"half"`` / ``"float"`` (as
#: ``torch.half``, ``torch.float``) and the dtypes themselves.
LUT_DTYPE_VALUES: dict[str | torch.dtype, torch.dtype] = {
    **LUT_DTYPES,
    "fp16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float": torch.float32,
    torch.float16: torch.float16, torch.float32: torch.float32,
}
#: The type of a ``lut_dtype`` argument (a name, as a YAML gives it, or a dtype).
LutDtype = Literal["float16", "float32", "fp16", "fp32", "half", "float"] | torch.dtype


def lut_dtype_of(value: object, name: str = "lut_dtype") -> torch.dtype:
    """The dtype that a ``lut_dtype`` argument ``value`` means (see :data:`LUT_DTYPE_VALUES`);
    a ``ValueError`` naming ``name``, the value and what is allowed for anything else (e.g.
    ``torch.bfloat16``: an artifact stores float16 or float32 LUTs)."""
    dtype = LUT_DTYPE_VALUES.get(value) if isinstance(value, (str, torch.dtype)) else None
    if dtype is None:
        names = ", ".join(repr(v) for v in LUT_DTYPE_VALUES if isinstance(v, str))
        raise ValueError(
            f"{name} must be torch.float16 or torch.float32, or one of the names {names}; "
            f"got {value!r}"
        )
    return dtype


def lut_dtype_name(value: object, name: str = "lut_dtype") -> str:
    """The name an artifact records for ``value`` (``"float16"`` or ``"float32"``), checked as
    :func:`lut_dtype_of` does."""
    return str(lut_dtype_of(value, name)).removeprefix("torch.")


def stored_bytes(layout: PaletteLayout, lut_dtype: LutDtype, bits: int | None = None) -> int:
    """Stored size of a tensor clustered with ``layout``, before any palette exists: its ``P``
    LUTs of ``2**bits x cluster_dim`` entries at ``lut_dtype``, its per-channel scales (one per
    output channel, same dtype) when the spec has them, and its ``P * n`` indices bit-packed at
    ``bits`` each. What :meth:`Palette.compressed_bytes` counts for a palette of this layout
    stored at ``lut_dtype`` (and so the report and the artifact: a float16 LUT that must stay
    float32, :meth:`Palette.stored_lut_dtype`, is the one case this cannot foresee). ``bits``
    (default: the layout's) sizes the same layout at another width."""
    itemsize = lut_dtype_of(lut_dtype).itemsize
    bits = layout.spec.bits if bits is None else bits
    P, n, d = layout.palette_shape
    lut = P * (1 << bits) * d * itemsize
    scale = layout.num_channels * itemsize if layout.spec.per_channel_scale else 0
    return lut + scale + packed_size(P * n, bits)


@dataclass
class Palette:
    """LUT ``(P, k, d)`` + indices ``(P, n)`` for one tensor, with the layout to rebuild it,
    and the per-channel scales ``(channels,)`` when the layout's spec has ``per_channel_scale``
    (``None`` otherwise)."""

    lut: Tensor
    indices: Tensor
    layout: PaletteLayout
    scale: Tensor | None = None

    def __post_init__(self) -> None:
        P, n, d = self.layout.palette_shape
        k = self.layout.spec.num_centroids
        if tuple(self.lut.shape) != (P, k, d):
            raise ValueError(
                f"{self.layout.name}: LUT shape {tuple(self.lut.shape)} != expected {(P, k, d)}"
            )
        if tuple(self.indices.shape) != (P, n):
            raise ValueError(
                f"{self.layout.name}: indices shape {tuple(self.indices.shape)} != expected "
                f"{(P, n)}"
            )
        if self.indices.is_floating_point():
            raise ValueError(f"{self.layout.name}: indices must be integers")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= k):
            raise ValueError(
                f"{self.layout.name}: indices must lie in [0, {k}); found "
                f"[{int(self.indices.min())}, {int(self.indices.max())}]"
            )
        self.layout.check_scale(self.scale)

    @property
    def name(self) -> str:
        return self.layout.name

    def vectors(self) -> Tensor:
        """``LUT[indices]`` as palettes ``(P, n, d)``."""
        idx = self.indices.long().unsqueeze(-1).expand(-1, -1, self.lut.shape[-1])
        return self.lut.gather(1, idx)

    def weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight in its original shape and in ``dtype`` (default: the LUT's),
        bit-for-bit ``LUT[indices]``. With per-channel scales it is ``LUT[indices] * scale``
        multiplied in float32 (float64 for a float64 LUT) and then cast, so a float16 LUT loads
        into a float32 model without a float16 rounding of the product."""
        dtype = self.lut.dtype if dtype is None else dtype
        if self.scale is None:
            return self.layout.from_palettes(self.vectors()).to(dtype)
        compute = torch.promote_types(self.lut.dtype, torch.float32)
        weight = self.layout.from_palettes(self.vectors().to(compute), self.scale.to(compute))
        return weight.to(dtype)

    def check_reproduces(self, weight: Tensor, name: str, remedy: str) -> None:
        """Raise a ``ValueError`` naming ``name``, how many elements differ and ``remedy``
        unless this palette reproduces ``weight`` bit for bit: the one "changed after
        finalize" error of every reader of palettes."""
        differ = int((self.weight(weight.dtype).to(weight.device) != weight).sum())
        if differ:
            raise ValueError(
                f"{name}: the weight no longer matches the palette ({differ} of "
                f"{weight.numel()} elements differ): it changed after finalize() (more "
                f"training steps, or an in-place edit). {remedy}"
            )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Palette:
        """This palette with its LUT and scales at ``dtype`` on ``device`` and its indices on
        ``device`` (``None``: as they are), like ``Tensor.to``; unlike ``Tensor.to``, never a
        silent ``inf``: see :meth:`check_fits`.

        Raises:
            ValueError: ``dtype`` cannot hold this palette (:meth:`check_fits`)."""
        if dtype is not None:
            self.check_fits(dtype)
        return Palette(
            lut=self.lut.to(device=device, dtype=dtype),
            indices=self.indices.to(device),
            layout=self.layout,
            scale=None if self.scale is None else self.scale.to(device=device, dtype=dtype),
        )

    def check_fits(self, dtype: torch.dtype) -> None:
        """Raise a ``ValueError`` naming this tensor, the value and ``dtype``'s range unless
        ``dtype`` holds every LUT entry, every per-channel scale and every ``LUT[indices] *
        scale`` (:meth:`weight` at ``dtype``, computed in float32 and then cast) as a finite
        number: a float32 LUT of a weight beyond 65504, cast to a float16 model, would be
        ``inf`` (the weight, the forward, everything after). The product is computed only when
        ``max |LUT| * max |scale|`` could overflow."""
        parts = [("its LUT", self.lut)]
        if self.scale is not None:
            parts.append(("its per-channel scales", self.scale))
        for what, values in parts:
            value = cast_overflow(values, dtype)
            if value is not None:
                raise ValueError(f"{self.name}: " + cast_overflow_message(what, value, dtype))
        if self.scale is None or not dtype.is_floating_point or not self.lut.numel():
            return
        bound = (float(self.lut.detach().abs().max().double())
                 * float(self.scale.detach().abs().max().double()))
        if bound >= torch.finfo(dtype).max:
            value = cast_overflow(self.weight(torch.promote_types(self.lut.dtype,
                                                                  torch.float32)), dtype)
            if value is not None:
                raise ValueError(f"{self.name}: " + cast_overflow_message(
                    "its weight (LUT[indices] x per-channel scale)", value, dtype))

    def index_grid(self) -> Tensor:
        """The indices laid out like the weight: its shape with the vector axis divided by
        ``cluster_dim`` (one index per vector), as Core ML's ``constexpr_lut_to_dense`` and a
        packed module store them."""
        layout = self.layout
        shape = [layout.shape[a] for a in layout._permutation]
        shape[-1] //= layout.spec.cluster_dim
        return self.indices.reshape(shape).permute(layout._inverse_permutation)

    # -- storage sizes -----------------------------------------------------------------------
    @property
    def num_indices(self) -> int:
        """Stored indices ``P * n``: one per d-vector of the weight."""
        P, n, _ = self.layout.palette_shape
        return P * n

    def index_bytes(self) -> int:
        """Bytes of the indices bit-packed at ``bits`` each over the whole tensor:
        ``ceil(P * n * bits / 8)`` (see :mod:`lightning_dkm.engine.bitpack`)."""
        return packed_size(self.num_indices, self.layout.spec.bits)

    def float16_problem(self) -> str | None:
        """Why float16 cannot hold this palette as it is (``None``: it can): a centroid beyond
        float16's range (:func:`cast_overflow`: it would be ``inf`` and the file unloadable), every
        centroid below float16's normal range (``|value| < 6.1e-5``, e.g. 1e-20 weights: they
        would lose their precision or become 0), or a per-channel scale that is not exactly a
        float16 number."""
        lut = self.lut.detach().float().reshape(-1)
        peak = float(lut.abs().max()) if lut.numel() else 0.0
        value = cast_overflow(lut, torch.float16)
        if value is not None:
            return (f"centroid {value:g} lies beyond the float16 range (|value| <= "
                    f"{FLOAT16_MAX:g}); stored in float16 it would be inf and the file could "
                    "not be loaded")
        if 0.0 < peak < FLOAT16_TINY:
            return (f"every centroid lies below float16's normal range (|value| < "
                    f"{FLOAT16_TINY:.2g}; the largest is {peak:g}); stored in float16 they "
                    "would lose their precision or become 0")
        scale = None if self.scale is None else self.scale.detach().float()
        if scale is not None and not torch.equal(scale.half().float(), scale):
            return ("a per-channel scale is not exactly a float16 number (below float16's "
                    "normal range)")
        return None

    def stored_lut_dtype(self, lut_dtype: LutDtype) -> torch.dtype:
        """The dtype the artifact stores this LUT at when ``lut_dtype`` is asked for.

        That is ``lut_dtype``, except ``torch.float32`` when ``lut_dtype`` is float16 and
        float16 cannot hold the palette (:meth:`float16_problem`). The scales are stored in the
        same dtype as the LUT. The artifact and the report both use this, so their sizes agree.
        """
        lut_dtype = lut_dtype_of(lut_dtype)
        if lut_dtype == torch.float16 and self.float16_problem() is not None:
            return torch.float32
        return lut_dtype

    def lut_bytes(self, lut_dtype: LutDtype | None = None) -> int:
        """Bytes of the ``P`` LUTs of ``k x d`` entries stored as ``lut_dtype`` (default: the
        LUT's own dtype)."""
        dtype = self.lut.dtype if lut_dtype is None else lut_dtype_of(lut_dtype)
        return self.lut.numel() * dtype.itemsize

    def scale_bytes(self, lut_dtype: LutDtype | None = None) -> int:
        """Bytes of the per-channel scales stored as ``lut_dtype`` (default: the LUT's dtype);
        0 without per-channel scale."""
        if self.scale is None:
            return 0
        dtype = self.lut.dtype if lut_dtype is None else lut_dtype_of(lut_dtype)
        return self.scale.numel() * dtype.itemsize

    def compressed_bytes(self, lut_dtype: LutDtype | None = None) -> int:
        """Stored size of this tensor: :meth:`lut_bytes` + :meth:`scale_bytes` +
        :meth:`index_bytes`."""
        return self.lut_bytes(lut_dtype) + self.scale_bytes(lut_dtype) + self.index_bytes()

    def distinct_values_per_palette(self) -> list[int]:
        """Number of distinct LUT entries (vectors) actually used by each palette."""
        return [int(torch.unique(self.indices[p]).numel()) for p in range(self.indices.shape[0])]
