"""A copy of a model's structure without its weights, to rebuild the plain model later.

Under FSDP2 the trained model's parameters are ``DTensor`` shards owned by FSDP, and the
clustered ones sit under DKM parametrizations that cannot be removed without detaching them
from FSDP. The finalized *plain* model (what finalize gives without FSDP: the module's own
class, no parametrizations, snapped weights) is therefore rebuilt on rank 0 from a skeleton
taken before any of that happened: :func:`tensorless_copy` deep-copies the module with every
parameter and persistent buffer replaced by a ``meta`` tensor of its shape (no memory),
non-persistent buffers copied as they are (a full state dict does not hold them), and
:func:`materialize` loads a full plain state dict into it with ``assign=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["materialize", "tensorless_copy"]


def tensorless_copy(module: nn.Module, leave_out: Iterable[Any] = ()) -> nn.Module:
    """``copy.deepcopy(module)`` with parameters and persistent buffers on the ``meta`` device
    and every object in ``leave_out`` (a Trainer, a device mesh) replaced by ``None``.

    Raises:
        TypeError: the module cannot be deep-copied (an attribute that refuses it), naming the
            reason.
    """
    memo: dict[int, Any] = {id(obj): None for obj in leave_out if obj is not None}
    for owner in module.modules():
        for param in owner._parameters.values():
            if param is not None and id(param) not in memo:
                memo[id(param)] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in owner._buffers.items():
            if (buffer is not None and name not in owner._non_persistent_buffers_set
                    and id(buffer) not in memo):
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    try:
        return copy.deepcopy(module, memo)
    except Exception as err:  # what deepcopy raises depends on the attribute
        raise TypeError(
            f"{type(module).__name__} cannot be copied without its weights to rebuild the "
            f"finalized plain model after FSDP ({type(err).__name__}: {err})"
        ) from err


def materialize(skeleton: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load the full plain ``state_dict`` into ``skeleton`` (``assign=True``: its tensors become
    the module's, on their device), strictly: every key of the skeleton and no other. Returns
    the skeleton, now a model."""
    skeleton.load_state_dict(dict(state_dict), strict=True, assign=True)
    return skeleton
