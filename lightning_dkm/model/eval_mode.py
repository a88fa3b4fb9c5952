"""A model in eval mode for a while, each module's own ``training`` flag restored afterwards.

``model.train()`` after ``model.eval()`` would not give the model back as it was: a model
trained with some submodules frozen in eval mode (batch norm fine-tuned as a fixed layer, a
teacher inside a student) would have them switched to training. Exporting, counting MACs and
calibrating each run the model in eval mode and must leave every flag as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["in_eval_mode"]


@contextlib.contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; every module's ``training`` flag as it was on exit
    (also after an exception)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
