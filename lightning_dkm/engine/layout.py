"""What a clustered tensor looks like to k-means: the spec (bits, cluster_dim, group_size) and
the layout that turns a weight tensor into palettes of vectors and back.

Conventions (the DKM paper reports "bits/dim" pairs; we spell them out):

* ``bits`` is the number of bits of one palette *index*; every palette has ``k = 2**bits``
  centroids. With ``cluster_dim = d > 1`` one index addresses a d-long vector, so the storage
  cost is ``bits / d`` bits per weight: ``bits=4, cluster_dim=2`` is 16 centroids of 2-vectors,
  2 bits per weight.
* Vectors run along the tensor's *input-channel* axis (``vector_axis``), which ``cluster_dim``
  must divide.
* ``group_size = None`` gives one palette for the whole tensor; ``group_size = g`` gives one
  palette per ``g`` consecutive output channels (``group_axis``), which ``g`` must divide.
* ``per_channel_scale = True`` divides each output channel by a scale before clustering (its
  largest ``|weight|``, rounded to float16) and multiplies it back after: the palettes then hold
  values in [-1, 1] and channels of very different magnitude share them well (coremltools'
  ``enable_per_channel_scale``). The scales are stored with the palette, one per channel.

A tensor of shape ``shape`` becomes ``x`` of shape ``(P, n, d)``: P palettes, n vectors each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_BITS", "MAX_CLUSTER_DIM", "ClusterSpec", "PaletteLayout", "channel_scale", "check_keys",
    "is_int", "is_number",
]

MAX_BITS = 8
MAX_CLUSTER_DIM = 8


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (what every integer field takes), of
    at least ``minimum`` when one is given."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (minimum is None or value >= minimum))


def check_keys(label: str, value: object, allowed: tuple[str, ...]) -> None:
    """``ValueError`` naming ``label`` unless ``value`` is a mapping whose keys are all in
    ``allowed`` (the one check of every option given as a mapping of named fields)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{label} must be a mapping with keys from {allowed}; got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{label} has unknown keys {unknown}; allowed: {allowed}")


def is_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool`` (what every real-valued
    field takes; its range is the caller's check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ClusterSpec:
    """How one tensor is clustered.

    Args:
        bits: bits per palette index, 1..8; the palette has ``2**bits`` entries.
        cluster_dim: length of the clustered vectors along the input-channel axis, 1..8.
        group_size: output channels that share one palette; ``None`` for one palette per tensor.
        per_channel_scale: cluster each output channel divided by its own scale (its largest
            ``|weight|``), stored with the palette; see the module docstring.
    """

    bits: int = 4
    cluster_dim: int = 1
    group_size: int | None = None
    per_channel_scale: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.bits) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in 1..{MAX_BITS}; got {self.bits!r}")
        if not is_int(self.cluster_dim) or not 1 <= self.cluster_dim <= MAX_CLUSTER_DIM:
            raise ValueError(
                f"cluster_dim must be an int in 1..{MAX_CLUSTER_DIM}; got {self.cluster_dim!r}"
            )
        if self.group_size is not None and not is_int(self.group_size, 1):
            raise ValueError(
                f"group_size must be None (one palette per tensor) or an int >= 1; "
                f"got {self.group_size!r}"
            )
        if not isinstance(self.per_channel_scale, bool):
            raise ValueError(
                f"per_channel_scale must be True or False; got {self.per_channel_scale!r}"
            )

    @property
    def num_centroids(self) -> int:
        """k = 2**bits."""
        return 1 << self.bits

    @property
    def bits_per_weight(self) -> float:
        """Index storage per scalar weight: ``bits / cluster_dim``."""
        return self.bits / self.cluster_dim


@dataclass(frozen=True)
class PaletteLayout:
    """Maps a weight tensor of ``shape`` to palettes ``(P, n, d)`` and back.

    Args:
        shape: the weight's shape (at least 2-D).
        spec: the :class:`ClusterSpec`.
        group_axis: the output-channel axis that ``group_size`` splits (0 for Linear/Conv/
            Embedding, 1 for ConvTranspose).
        vector_axis: the input-channel axis along which ``cluster_dim`` vectors run.
        name: the parameter's name, used in error messages.
    """

    shape: tuple[int, ...]
    spec: ClusterSpec
    group_axis: int = 0
    vector_axis: int = 1
    name: str = "weight"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"{self.name}: only tensors with >= 2 dims are clustered; got {shape}")
        for label, axis in (("group_axis", self.group_axis), ("vector_axis", self.vector_axis)):
            if not -ndim <= axis < ndim:
                raise ValueError(f"{self.name}: {label}={axis} is out of range for shape {shape}")
        object.__setattr__(self, "group_axis", self.group_axis % ndim)
        object.__setattr__(self, "vector_axis", self.vector_axis % ndim)
        if self.group_axis == self.vector_axis:
            raise ValueError(f"{self.name}: group_axis and vector_axis must differ")
        d, g = self.spec.cluster_dim, self.spec.group_size
        vec_len = shape[self.vector_axis]
        if vec_len % d:
            raise ValueError(
                f"{self.name}: cluster_dim={d} does not divide the input-channel axis "
                f"(size {vec_len}, shape {shape}); allowed: a divisor of {vec_len} in "
                f"1..{MAX_CLUSTER_DIM}"
            )
        channels = shape[self.group_axis]
        if g is not None and channels % g:
            raise ValueError(
                f"{self.name}: group_size={g} does not divide the output-channel axis "
                f"(size {channels}, shape {shape}); allowed: None or a divisor of {channels}"
            )
        k = self.spec.num_centroids
        if self.vectors_per_palette < k:
            raise ValueError(
                f"{self.name}: each palette holds {self.vectors_per_palette} vectors, fewer than "
                f"2**bits = {k} centroids (shape {shape}, bits={self.spec.bits}, cluster_dim={d}, "
                f"group_size={g}); use fewer bits, a larger group_size, or skip this tensor"
            )

    # -- dict form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The layout as JSON-ready primitives, the one dict form that every file holding a
        palette writes (the artifact's layout entries, the ddp_spawn handoff): ``shape``,
        ``bits``, ``cluster_dim``, ``group_size``, ``group_axis``, ``vector_axis``, and
        ``per_channel_scale: True`` only where the spec has it. Not the name: files key the
        entries by it. :meth:`from_dict` reads it back."""
        spec = self.spec
        data: dict[str, Any] = {
            "shape": list(self.shape), "bits": spec.bits, "cluster_dim": spec.cluster_dim,
            "group_size": spec.group_size, "group_axis": self.group_axis,
            "vector_axis": self.vector_axis,
        }
        if spec.per_channel_scale:
            data["per_channel_scale"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "weight") -> PaletteLayout:
        """The layout named ``name`` that :meth:`to_dict` wrote (other keys are ignored).

        Raises:
            ValueError: a field that :class:`ClusterSpec` or the layout refuses (the shape and
                the axes are the caller's to check for type when ``data`` is untrusted).
        """
        spec = ClusterSpec(data["bits"], data["cluster_dim"], data["group_size"],
                           per_channel_scale=data.get("per_channel_scale", False))
        return cls(tuple(data["shape"]), spec, data["group_axis"], data["vector_axis"], name=name)

    @classmethod
    def of_lut(
        cls, shape: tuple[int, ...], lut_shape: tuple[int, ...], group_axis: int,
        vector_axis: int, *, per_channel_scale: bool = False, name: str = "weight",
    ) -> PaletteLayout:
        """The layout of a weight of ``shape`` whose palettes a LUT ``(P, k, d)`` holds (a
        checkpoint's centroids, a model's carried LUT): ``bits = log2(k)``, ``cluster_dim =
        d``, one palette per ``shape[group_axis] // P`` output channels (``None`` for ``P =
        1``).

        Raises:
            ValueError: ``k`` is not a power of two, or the layout refuses the result.
        """
        P, k, d = lut_shape[-3:]
        bits = k.bit_length() - 1
        if 1 << bits != k:
            raise ValueError(f"{name}: the LUT has {k} entries, not a power of two")
        group_size = None if P == 1 else shape[group_axis] // P
        spec = ClusterSpec(bits=bits, cluster_dim=d, group_size=group_size,
                           per_channel_scale=per_channel_scale)
        return cls(tuple(shape), spec, group_axis, vector_axis, name=name)

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_palettes(self) -> int:
        """P: one palette per ``group_size`` output channels, or 1."""
        g = self.spec.group_size
        return 1 if g is None else self.shape[self.group_axis] // g

    @property
    def vectors_per_palette(self) -> int:
        """n: the number of d-vectors each palette indexes."""
        return self.numel // (self.num_palettes * self.spec.cluster_dim)

    @property
    def num_channels(self) -> int:
        """The size of the output-channel axis (``group_axis``): one scale per channel."""
        return self.shape[self.group_axis]

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        """The shape of the stored per-channel scales, ``(num_channels,)``, or ``None`` when the
        spec has no per-channel scale."""
        return (self.num_channels,) if self.spec.per_channel_scale else None

    @property
    def palette_shape(self) -> tuple[int, int, int]:
        return (self.num_palettes, self.vectors_per_palette, self.spec.cluster_dim)

    @property
    def _permutation(self) -> tuple[int, ...]:
        rest = [a for a in range(len(self.shape)) if a not in (self.group_axis, self.vector_axis)]
        return (self.group_axis, *rest, self.vector_axis)

    @property
    def _inverse_permutation(self) -> tuple[int, ...]:
        perm = self._permutation
        return tuple(perm.index(axis) for axis in range(len(perm)))

    # -- mapping -----------------------------------------------------------------------------
    def check(self, weight: Tensor) -> None:
        """Errors for a tensor this layout cannot cluster: wrong shape, non-float, NaN/Inf."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"{self.name}: expected shape {self.shape}, got {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            raise ValueError(
                f"{self.name}: only floating-point weights can be clustered; got {weight.dtype}"
            )
        if weight.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(weight))).all()):
            bad = weight.numel() - int(torch.isfinite(weight).sum())  # NaN propagates
            raise ValueError(
                f"{self.name}: weight contains NaN or Inf values ({bad} of {weight.numel()} "
                "elements); only finite weights can be clustered"
            )

    def check_scale(self, scale: Tensor | None) -> None:
        """Errors for per-channel scales that do not fit this layout: any scale without the
        spec's ``per_channel_scale``; with it, none, another shape than :attr:`scale_shape`,
        or values that are not finite floats > 0. Every holder of scales checks them here."""
        if self.scale_shape is None:
            if scale is not None:
                raise ValueError(f"{self.name}: a per-channel scale was given but the spec has "
                                 "per_channel_scale=False")
            return
        if scale is None or tuple(scale.shape) != self.scale_shape:
            got = None if scale is None else tuple(scale.shape)
            raise ValueError(f"{self.name}: per_channel_scale needs a scale of shape "
                             f"{self.scale_shape} (one per output channel); got {got}")
        if not scale.is_floating_point() or not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"{self.name}: per-channel scales must be finite floats > 0")

    def broadcast_scale(self, scale: Tensor) -> Tensor:
        """Per-channel ``scale`` ``(num_channels,)`` shaped to broadcast against the weight."""
        return scale.reshape(self._along_groups(self.num_channels))

    def broadcast_lut(self, lut: Tensor) -> Tensor:
        """A LUT ``(P, k, d)`` shaped as coremltools' and Core AI's LUT ops hold it: the
        weight's rank with ``P`` on the output-channel axis and 1 elsewhere, then ``(k, d)``."""
        return lut.reshape(*self._along_groups(self.num_palettes), *lut.shape[1:])

    def _along_groups(self, size: int) -> list[int]:
        shape = [1] * len(self.shape)
        shape[self.group_axis] = size
        return shape

    def to_palettes(self, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """``weight`` (shape) -> ``(P, n, d)``, each channel divided by ``scale`` when given.
        Differentiable; a view when no permute (and no scale) is needed."""
        if scale is not None:
            weight = weight / self.broadcast_scale(scale.to(weight))
        permuted = weight.permute(self._permutation)
        return permuted.reshape(self.palette_shape)

    @property
    def order_free(self) -> bool:
        """Scalar clustering of one palette: the order of its weights matters to no step, so a
        flat view of the weight can stand for the palettes (:meth:`step_view`)."""
        return self.spec.cluster_dim == 1 and self.num_palettes == 1

    def step_view(self, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """``weight`` as a DKM step's input ``(P, n, d)``: :meth:`to_palettes`, or where the
        layout is :attr:`order_free` a flat view (no permuted copy)."""
        if scale is not None:
            weight = weight / self.broadcast_scale(scale.to(weight))
        return weight.reshape(1, -1, 1) if self.order_free else self.to_palettes(weight)

    def from_step_view(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """The inverse of :meth:`step_view`: a step's output in the weight's shape and units."""
        x = x.reshape(self.shape) if self.order_free else self.from_palettes(x)
        return x if scale is None else x * self.broadcast_scale(scale.to(x))

    def from_palettes(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """``(P, n, d)`` -> a tensor of ``shape``, each channel multiplied by ``scale`` when
        given; the inverse of :meth:`to_palettes` (exact without a scale)."""
        permuted_shape = tuple(self.shape[a] for a in self._permutation)
        weight = x.reshape(permuted_shape).permute(self._inverse_permutation).contiguous()
        if scale is not None:
            weight = weight * self.broadcast_scale(scale.to(weight))
        return weight

    @torch.no_grad()
    def channel_scale(self, weight: Tensor) -> Tensor | None:
        """The per-channel scales of ``weight`` for this layout (``None`` without
        ``per_channel_scale``): see :func:`channel_scale`."""
        if not self.spec.per_channel_scale:
            return None
        return channel_scale(weight, self.group_axis)


@torch.no_grad()
def channel_scale(weight: Tensor, axis: int = 0) -> Tensor:
    """One float32 scale per index of ``axis``: the channel's largest ``|weight|``, rounded to
    the nearest float16 when float16 holds it as a normal number (so a float16 artifact stores it
    exactly), and 1.0 for an all-zero channel (nothing to scale)."""
    dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
    peak = weight.detach().float().abs().amax(dim=dims) if dims else weight.detach().float().abs()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    rounded = peak.half().float()
    fits = (rounded >= torch.finfo(torch.float16).tiny) & torch.isfinite(rounded)
    return torch.where(fits, rounded, peak)
