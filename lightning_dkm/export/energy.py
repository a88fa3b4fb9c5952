"""MAC counting and a first-order energy model for one inference.

This is an *estimate* in the spirit of Deep k-Means (Wu et al., ICML 2018), whose premise is
that fetching weights dominates inference energy, so a model stored at fewer bits per weight
costs less to run. It is never a measurement: real energy depends on the hardware, caching,
batch size and data reuse, none of which is modelled.

Energy constants (:class:`EnergyModel`) are from M. Horowitz, "Computing's energy problem (and
what we can do about it)", ISSCC 2014, for a 45 nm process at 0.9 V:

* 32-bit DRAM read: 640 pJ;
* 32-bit SRAM read (8 KB array): 5 pJ;
* 32-bit float multiply 3.7 pJ + add 0.9 pJ: a MAC of ~4.6 pJ;
* 16-bit float multiply 1.1 pJ + add 0.4 pJ: a MAC of ~1.5 pJ.

Assumptions: every stored tensor is fetched once per inference from DRAM at its stored width
(energy proportional to bytes: 640 pJ per 4 bytes); each palette index is then resolved by one
LUT lookup from SRAM (5 pJ per 32 bits read, so a ``d``-vector of fp16 entries costs
``ceil(2 d / 4)`` reads); arithmetic is the same for the dense and the clustered model
(clustering changes storage, not the MACs), at ``mac_pj`` each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.layout import is_number
from ..model.eval_mode import in_eval_mode
from ..model.targets import CONV, CONV_TRANSPOSE, clusterable_parameters

__all__ = [
    "DRAM_READ_32BIT_PJ",
    "FP16_MAC_PJ",
    "FP32_MAC_PJ",
    "SRAM_READ_32BIT_PJ",
    "EnergyModel",
    "count_macs",
]

#: Horowitz, ISSCC 2014 (45 nm): energy of one 32-bit read from DRAM, in pJ.
DRAM_READ_32BIT_PJ = 640.0
#: Horowitz, ISSCC 2014 (45 nm): energy of one 32-bit read from an 8 KB SRAM, in pJ.
SRAM_READ_32BIT_PJ = 5.0
#: Horowitz, ISSCC 2014 (45 nm): 32-bit float multiply (3.7 pJ) + add (0.9 pJ).
FP32_MAC_PJ = 4.6
#: Horowitz, ISSCC 2014 (45 nm): 16-bit float multiply (1.1 pJ) + add (0.4 pJ).
FP16_MAC_PJ = 1.5

_PJ_TO_UJ = 1e-6


def _check_energy(name: str, value: float) -> float:
    if not is_number(value) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0 (pJ); got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EnergyModel:
    """Per-operation energies in pJ (defaults: Horowitz, ISSCC 2014, 45 nm; see the module
    docstring). Pass ``mac_pj=FP16_MAC_PJ`` to estimate a model that computes in fp16."""

    dram_read_pj: float = DRAM_READ_32BIT_PJ
    sram_read_pj: float = SRAM_READ_32BIT_PJ
    mac_pj: float = FP32_MAC_PJ

    def __post_init__(self) -> None:
        for name in ("dram_read_pj", "sram_read_pj", "mac_pj"):
            _check_energy(name, getattr(self, name))

    def fetch_uj(self, nbytes: int) -> float:
        """DRAM energy to fetch ``nbytes`` once (640 pJ per 4 bytes by default), in µJ."""
        return nbytes / 4 * self.dram_read_pj * _PJ_TO_UJ

    def lookup_uj(self, lookups: int, bytes_per_lookup: int) -> float:
        """SRAM energy of ``lookups`` LUT reads of ``bytes_per_lookup`` each (whole 32-bit
        words), in µJ."""
        return lookups * math.ceil(bytes_per_lookup / 4) * self.sram_read_pj * _PJ_TO_UJ

    def compute_uj(self, macs: int) -> float:
        """Energy of ``macs`` multiply-accumulates, in µJ."""
        return macs * self.mac_pj * _PJ_TO_UJ


def _first_tensor(args: tuple, kwargs: dict, position: int, name: str) -> Tensor:
    return args[position] if len(args) > position else kwargs[name]


def _mha_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(q/k/v in-projection MACs, output-projection MACs) of one attention call."""
    query = _first_tensor(args, kwargs, 0, "query")
    key = _first_tensor(args, kwargs, 1, "key")
    value = _first_tensor(args, kwargs, 2, "value")
    e, kdim, vdim = module.embed_dim, module.kdim, module.vdim
    q_tokens = query.numel() // e
    in_proj = q_tokens * e * e + key.numel() // kdim * kdim * e + value.numel() // vdim * vdim * e
    return in_proj, q_tokens * e * e


def _macs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, CONV):
        return output.numel() * math.prod(module.weight.shape[1:])
    if isinstance(module, CONV_TRANSPOSE):
        # Every input element is multiplied by (out_channels / groups) * prod(kernel) weights.
        return _first_tensor(args, kwargs, 0, "input").numel() * math.prod(module.weight.shape[1:])
    return 0  # Embedding / EmbeddingBag: table lookups, no multiplies


def _call(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, tuple):
        model(*example_input)
    elif isinstance(example_input, Mapping):
        model(**example_input)
    else:
        model(example_input)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_input``, per module.

    Counted, summed over every call of a module during the pass: ``Linear`` (``out.numel() *
    in_features``), ``Conv1d/2d/3d`` (``out.numel() * in_channels / groups * prod(kernel)``),
    ``ConvTranspose1d/2d/3d`` (``in.numel() * out_channels / groups * prod(kernel)``),
    ``MultiheadAttention`` (its q/k/v in-projections under the attention module's name, its
    output projection under ``<name>.out_proj``, which attention calls functionally; the
    activation-by-activation products of attention are not weight MACs and are left out) and
    ``Embedding``/``EmbeddingBag`` (0: lookups). Bias additions are not counted. Other modules
    are not listed; their MACs are not counted.

    The pass runs in eval mode (no batch-norm statistics are updated, no dropout), under
    ``torch.no_grad()`` and with PyTorch's fused attention fast path off (it would bypass the
    modules' hooks); the model's training flags are restored afterwards.

    Args:
        model: the model; ``example_input`` must be on its device.
        example_input: a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
            (``model(**x)``), as ``LightningModule.example_input_array``.

    Returns:
        ``{module name: MACs}`` for every supported module (``""`` is the root module).
    """
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not clusterable_parameters(module):  # the module types DKM clusters
            continue
        counts[name] = 0

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, _name: str = name) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                in_proj, out_proj = _mha_macs(mod, args, kwargs)
                counts[_name] += in_proj
                out_name = f"{_name}.out_proj" if _name else "out_proj"
                counts[out_name] = counts.get(out_name, 0) + out_proj
            else:
                counts[_name] += _macs(mod, args, kwargs, output)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with in_eval_mode(model):
            _call(model, example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    return counts
