"""Tied weights under DKM: one Parameter, several owners, one clustered tensor.

A model may use one Parameter in two modules (an embedding shared with the output projection).
DKM registers its :class:`~lightning_dkm.engine.parametrization.DKMParametrization` on the first
owner; each further owner gets a :class:`TiedWeight`, whose forward returns the first owner's
clustered weight. So every use of the tensor in the loss sees the same clustered value, the
gradient of every use reaches the one Parameter through the DKM step, and under
``parametrize.cached()`` (entered by the callback for each training forward) the DKM step runs
once for all owners.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TiedWeight"]


class TiedWeight(nn.Module):
    """The parametrization of a tied weight's further owner: it reads ``owner.<param_name>``.

    Its input (the shared Parameter, registered as this owner's ``original``) is ignored; the
    first owner computes the clustered tensor from the same Parameter. The owner is held as a
    plain attribute, not a submodule, so it is neither a second copy in ``state_dict`` nor a
    cycle in the module tree.

    Args:
        owner: the module that holds the DKM parametrization of the tensor.
        param_name: the tensor's name on ``owner`` (e.g. ``"weight"``).
        owner_name: ``owner``'s qualified parameter name, for messages and finalize.
    """

    def __init__(self, owner: nn.Module, param_name: str, owner_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.param_name = param_name
        self.owner_name = owner_name

    def forward(self, weight: Tensor) -> Tensor:
        return getattr(self.owner, self.param_name)

    def extra_repr(self) -> str:
        return f"tied to {self.owner_name}"
