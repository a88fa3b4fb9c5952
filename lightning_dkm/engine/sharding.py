"""Weights that FSDP2 (``torch.distributed.fsdp.fully_shard``) shards across ranks.

Under FSDP2 a clustered weight's trainable original is a ``DTensor`` whose local tensor is this
rank's rows. Inside the module's forward FSDP2 all-gathers it, so the parametrization clusters
the whole weight there, identically on every rank (the gathered values are the same
everywhere). Outside the forward (seeding the centroids, metrics, finalize) the code that needs
the whole weight asks for it here: :func:`full_tensor` gathers it (a collective: every rank must
call it, in the same order) and :func:`write_full` writes a whole tensor back into this rank's
shard. Plain tensors pass through both unchanged, so single-device and DDP code is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["full_tensor", "is_sharded", "shard_like", "write_full"]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2- or tensor-parallel-managed parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole (detached) value of ``tensor``: gathered from every rank if it is a
    ``DTensor`` (a collective), else ``tensor.detach()`` itself."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(param: Tensor, value: Tensor) -> Tensor:
    """The whole tensor ``value`` (the same on every rank) laid out as ``param``: this rank's
    part of it as a ``DTensor`` of ``param``'s mesh and placements (no communication: each rank
    takes its own part), or ``value`` itself for a plain ``param``. Device and dtype follow
    ``param``."""
    value = value.to(device=param.device, dtype=param.dtype)
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def write_full(param: Tensor, value: Tensor) -> None:
    """Write the whole tensor ``value`` (the same on every rank) into ``param``, in place: into
    this rank's shard for a ``DTensor``."""
    param.copy_(shard_like(param, value))
