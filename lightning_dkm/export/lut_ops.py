"""The dense weight a LUT op of an Apple package computes, in numpy.

Core ML's ``constexpr_lut_to_dense`` and Core AI's ``lut_to_dense`` share one definition: the
indices have the weight's shape with the vector axis divided by the vector length ``d``; the LUT
has shape ``(*blocks, k, d)``, one palette per block of indices along each axis (so
``blocks[a]`` divides ``indices.shape[a]``); every index picks a ``d``-vector from its block's
palette, laid along the vector axis; a per-channel scale op may multiply the result. Both
readers (:mod:`.coreml`, :mod:`.coreai`) return the ops they find as :class:`LutOp`, whose
:meth:`~LutOp.weight` rebuilds the weight: that is how the tests compare a package with the
model it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LutOp"]


@dataclass(frozen=True)
class LutOp:
    """One LUT op of a saved package (module docstring), as numpy arrays.

    Attributes:
        name: the op's name in the program (Core AI ops have none: ``lut_to_dense #<i>``, their
            position in program order).
        bits: the index width.
        lut: shape ``(*blocks, k, d)``, one palette per block (rank of the weight + 2).
        indices: the weight's shape, the vector axis divided by the vector length ``d``.
        axis: the axis the vectors run along (``None``: Core ML's default, 0).
        scale: the per-channel scales applied after the op, or ``None``.
    """

    name: str
    bits: int
    lut: np.ndarray
    indices: np.ndarray
    axis: int | None
    scale: np.ndarray | None

    def weight(self) -> np.ndarray:
        """The dense weight the op (and its scale op) produce: ``LUT[indices]`` laid out as the
        weight (vectors along ``axis``, 0 when ``None``), times ``scale`` when given; float32
        arithmetic on the stored values."""
        lut = self.lut.astype(np.float32)
        idx = self.indices.astype(np.int64)
        # the palette of every index: its block along each axis
        block = [np.arange(idx.shape[a]) // (idx.shape[a] // lut.shape[a])
                 for a in range(idx.ndim)]
        values = lut[(*np.meshgrid(*block, indexing="ij"), idx)]  # (..., d)
        d = lut.shape[-1]
        if d > 1:
            axis = 0 if self.axis is None else self.axis
            values = np.moveaxis(values, -1, axis + 1)
            shape = list(idx.shape)
            shape[axis] *= d
            values = values.reshape(shape)
        else:
            values = values[..., 0]
        if self.scale is not None:
            values = values * self.scale.astype(np.float32)
        return values
