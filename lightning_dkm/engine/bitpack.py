"""Pack integer indices into bytes at exactly ``bits`` bits each, and unpack them.

The stream is little-endian at the bit level: index ``i`` occupies bits ``i*bits ..
(i+1)*bits - 1`` of the stream, and bit ``b`` of the stream is bit ``b % 8`` (least significant
first) of byte ``b // 8``. ``count`` indices take ``ceil(count * bits / 8)`` bytes; the unused
high bits of the last byte are zero. For ``bits = 2``, ``[1, 2, 3, 0]`` packs to the single byte
``0b00_11_10_01``.

Both directions are vectorised: 8 indices of ``bits`` bits are exactly ``bits`` bytes, so each
group of 8 is assembled into one 64-bit word and cut into bytes (or back). Work proceeds in
chunks of a fixed number of indices, so the temporaries stay bounded (tens of MiB) for tensors of
any size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import is_int

__all__ = ["MAX_PACK_BITS", "pack_bits", "packed_size", "unpack_bits"]

MAX_PACK_BITS = 8

# Indices per chunk; a multiple of 8, so every chunk starts on a byte boundary for any `bits`.
_CHUNK = 1 << 20


def _check_bits(bits: int) -> int:
    if not is_int(bits, 1) or bits > MAX_PACK_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_PACK_BITS}; got {bits!r}")
    return bits


def _check_count(count: int) -> int:
    if not is_int(count, 0):
        raise ValueError(f"count must be an int >= 0; got {count!r}")
    return count


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits occupy: ``ceil(count * bits / 8)``."""
    return (_check_count(count) * _check_bits(bits) + 7) // 8


def pack_bits(indices: Tensor, bits: int) -> Tensor:
    """Pack integer ``indices`` (any shape, read in row-major order) into a 1-D uint8 tensor.

    Args:
        indices: integer tensor with every value in ``[0, 2**bits)``.
        bits: bits per index, 1..8.

    Returns:
        ``packed_size(indices.numel(), bits)`` bytes on the device of ``indices``.

    Raises:
        ValueError: ``bits`` out of range, non-integer ``indices``, or a value that does not fit.
    """
    _check_bits(bits)
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex() \
            or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be an integer tensor; got {got}")
    flat = indices.detach().reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"indices must lie in [0, {1 << bits}) for bits={bits}; found [{lo}, {hi}]"
            )
    count = flat.numel()
    out = torch.empty(packed_size(count, bits), dtype=torch.uint8, device=flat.device)
    to_word = bits * torch.arange(8, dtype=torch.int64, device=flat.device)
    to_bytes = 8 * torch.arange(bits, dtype=torch.int64, device=flat.device)
    for start in range(0, count, _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.int64)
        m = chunk.numel()
        if m % 8:
            chunk = torch.cat([chunk, chunk.new_zeros(-m % 8)])
        # 8 indices fill exactly `bits` bytes: gather them into one 64-bit word (disjoint bits,
        # so the sum is an OR; bit 63 may wrap the sign, which leaves the bit pattern intact),
        # then cut the word into bytes.
        words = (chunk.view(-1, 8) << to_word).sum(1)
        packed = ((words.unsqueeze(1) >> to_bytes) & 0xFF).to(torch.uint8).reshape(-1)
        offset = start * bits // 8
        out[offset : offset + packed_size(m, bits)] = packed[: packed_size(m, bits)]
    return out


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``count`` indices as a 1-D int64 tensor.

    Raises:
        ValueError: ``bits`` or ``count`` out of range, ``packed`` not a 1-D uint8 tensor of
            exactly ``packed_size(count, bits)`` bytes, or non-zero padding bits.
    """
    _check_bits(bits)
    _check_count(count)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.ndim != 1:
        got = (
            f"{packed.dtype} of shape {tuple(packed.shape)}"
            if isinstance(packed, Tensor)
            else type(packed).__name__
        )
        raise ValueError(f"packed must be a 1-D uint8 tensor; got {got}")
    expected = packed_size(count, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed holds {packed.numel()} bytes; {count} indices of {bits} bits need exactly "
            f"{expected}"
        )
    tail = count * bits % 8
    if tail and int(packed[-1]) >> tail:
        raise ValueError(f"the padding bits of the last byte must be zero; got {int(packed[-1])}")
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole indices per byte, one shift-and-mask
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:count].long()
    out = torch.empty(count, dtype=torch.int64, device=packed.device)
    from_bytes = 8 * torch.arange(bits, dtype=torch.int64, device=packed.device)
    from_word = bits * torch.arange(8, dtype=torch.int64, device=packed.device)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        offset = start * bits // 8
        chunk = packed[offset : offset + packed_size(m, bits)].to(torch.int64)
        if chunk.numel() % bits:
            chunk = torch.cat([chunk, chunk.new_zeros(-chunk.numel() % bits)])
        words = (chunk.view(-1, bits) << from_bytes).sum(1)  # `bits` bytes = 8 indices
        out[start : start + m] = ((words.unsqueeze(1) >> from_word) & mask).reshape(-1)[:m]
    return out
