"""The model as an exporter sees it: unwrapped, in eval mode, safe to trace.

Both exporters (Core ML traces with ``torch.jit.trace``, Core AI with ``torch.export``) walk the
module's attributes. A ``LightningModule`` outside a Trainer raises on one of them
(``module.trainer``: "is not attached to a `Trainer`"); Lightning's own ``to_torchscript`` avoids
that with its ``_jit_is_scripting`` flag, under which the property returns ``None``. This module
sets that flag on the instances being exported (duck-typed: the export layer does not import
Lightning) and restores everything afterwards, so the same call works for a plain
``nn.Module``, a ``LightningModule`` inside or outside a Trainer, and either behind a
``torch.compile`` or DDP wrapper. :func:`exported_palettes` is what both exporters export.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..engine.palette import Palette
from ..model.carried import carried_palettes
from ..model.eval_mode import in_eval_mode
from ..model.state import unwrap

__all__ = ["as_example_tuple", "exportable", "exported_palettes"]

#: The class attribute ``LightningModule`` reads in its ``trainer`` property.
_LIGHTNING_SCRIPTING_FLAG = "_jit_is_scripting"


def as_example_tuple(example_inputs: object, argument: str = "example_inputs") -> tuple:
    """``example_inputs`` as a tuple of tensors (one tensor is one input); a clear error for
    anything else (a dict, ``None``, a non-tensor element)."""
    examples = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
    if not isinstance(examples, Sequence) or isinstance(examples, str | bytes):
        raise ValueError(
            f"{argument} must be a tensor or a sequence of tensors (the model's positional "
            f"inputs); got {type(example_inputs).__name__}"
        )
    for i, example in enumerate(examples):
        if not isinstance(example, Tensor):
            raise ValueError(
                f"{argument}[{i}] must be a tensor; got {type(example).__name__}"
            )
    return tuple(examples)


@contextmanager
def exportable(model: nn.Module) -> Iterator[nn.Module]:
    """The module inside ``model``'s wrappers, in eval mode under ``no_grad`` with Lightning's
    tracing flag set on every ``LightningModule`` in it; everything restored on exit."""
    inner = unwrap(model)
    flagged = [
        m for m in inner.modules()
        if isinstance(getattr(type(m), _LIGHTNING_SCRIPTING_FLAG, None), bool)
        and _LIGHTNING_SCRIPTING_FLAG not in vars(m)
    ]
    for module in flagged:
        object.__setattr__(module, _LIGHTNING_SCRIPTING_FLAG, True)
    try:
        with in_eval_mode(inner), torch.no_grad():
            yield inner
    finally:
        for module in flagged:
            vars(module).pop(_LIGHTNING_SCRIPTING_FLAG, None)


def exported_palettes(module: nn.Module, exporter: str) -> dict[str, Palette]:
    """The palettes ``module`` carries (validated against its weights by
    :func:`~lightning_dkm.model.carried.carried_palettes`); a warning from ``exporter`` when it
    carries none, since every weight is then exported dense."""
    palettes = carried_palettes(module)
    if not palettes:
        warnings.warn(
            f"{exporter}: the model carries no palettes (not finalized or palettized?), so "
            "every weight is exported dense",
            UserWarning,
            stacklevel=3,
        )
    return palettes
