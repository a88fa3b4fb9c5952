"""The finalized form of a clustered tensor: a look-up table (LUT) plus integer indices.

Per palette ``p`` the LUT holds ``k = 2**bits`` centroids of length ``cluster_dim`` and every
d-vector of the weight is stored as an index into it. ``Palette.weight()`` rebuilds the dense
weight as ``LUT[indices]`` laid back into the tensor's shape; it is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .bitpack import packed_size
from .layout import PaletteLayout

__all__ = ["FLOAT16_MAX", "Palette"]

#: The largest finite float16 (65504). A centroid beyond it would be stored as ``inf`` in a
#: float16 LUT, so such a LUT is stored in float32 instead (see :meth:`Palette.stored_lut_dtype`).
FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass
class Palette:
    """LUT ``(P, k, d)`` + indices ``(P, n)`` for one tensor, with the layout to rebuild it."""

    lut: Tensor
    indices: Tensor
    layout: PaletteLayout

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

    @property
    def name(self) -> str:
        return self.layout.name

    def vectors(self) -> Tensor:
        """``LUT[indices]`` as palettes ``(P, n, d)``."""
        idx = self.indices.long().unsqueeze(-1).expand(-1, -1, self.lut.shape[-1])
        return self.lut.gather(1, idx)

    def weight(self) -> Tensor:
        """The dense weight in its original shape, bit-for-bit ``LUT[indices]``."""
        return self.layout.from_palettes(self.vectors())

    # -- storage sizes -----------------------------------------------------------------------
    @property
    def num_indices(self) -> int:
        """Stored indices ``P * n``: one per d-vector of the weight."""
        P, n, _ = self.layout.palette_shape
        return P * n

    def index_bytes(self) -> int:
        """Bytes of the indices bit-packed at ``bits`` each over the whole tensor:
        ``ceil(P * n * bits / 8)`` (see :mod:`lightning_dkm.bitpack`)."""
        return packed_size(self.num_indices, self.layout.spec.bits)

    def max_abs_centroid(self) -> float:
        """The largest ``|value|`` in the LUT (0.0 for an empty one)."""
        return float(self.lut.detach().abs().max()) if self.lut.numel() else 0.0

    def stored_lut_dtype(self, lut_dtype: torch.dtype) -> torch.dtype:
        """The dtype the artifact stores this LUT at when ``lut_dtype`` is asked for.

        That is ``lut_dtype``, except ``torch.float32`` when ``lut_dtype`` is float16 and a
        centroid lies beyond float16's range (``|value| > 65504``): cast to float16 it would
        become ``inf``, and a file with an infinite LUT cannot be loaded. The artifact and the
        report both use this, so their sizes agree.
        """
        if lut_dtype == torch.float16 and self.max_abs_centroid() > FLOAT16_MAX:
            return torch.float32
        return lut_dtype

    def lut_bytes(self, lut_dtype: torch.dtype | None = None) -> int:
        """Bytes of the ``P`` LUTs of ``k x d`` entries stored as ``lut_dtype`` (default: the
        LUT's own dtype)."""
        dtype = self.lut.dtype if lut_dtype is None else lut_dtype
        return self.lut.numel() * dtype.itemsize

    def compressed_bytes(self, lut_dtype: torch.dtype | None = None) -> int:
        """Stored size of this tensor: :meth:`lut_bytes` + :meth:`index_bytes`."""
        return self.lut_bytes(lut_dtype) + self.index_bytes()

    def distinct_values_per_palette(self) -> list[int]:
        """Number of distinct LUT entries (vectors) actually used by each palette."""
        return [int(torch.unique(self.indices[p]).numel()) for p in range(self.indices.shape[0])]


# -- writing files atomically -----------------------------------------------------------------
# The artifact and the report both persist finalized palettes; this is their one file writer.
# (It would sit in a layer-0 module of its own; it lives here because both already import
# palette, see docs/architecture.md.)
