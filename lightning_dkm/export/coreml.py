"""Core ML export: a finalized model as an ``.mlpackage`` whose clustered weights are LUT ops.

``export_coreml`` traces the model and converts it with coremltools (the ``coreml`` extra:
``pip install "lightning-dkm[coreml]"``) to an ML program. The converter reads the compression
metadata a finalized model carries (:mod:`lightning_dkm.model.carried`: ``_COREML_/<param>/lut`` and
friends) and writes every clustered tensor as one ``constexpr_lut_to_dense`` op holding our
LUT and indices (per tensor, per ``group_size`` block of channels, ``cluster_dim``-vectors along
``vector_axis``), followed by ``constexpr_blockwise_shift_scale`` where the tensor has
per-channel scales. That path preserves our palettes entry for entry (the LUT in float16, as
the artifact stores it); re-palettizing the snapped weights with
``ct.optimize.coreml.palettize_weights(mode="unique")`` would find the same values but not our
grouping or vectors.

Conversion runs on any OS; running the model needs macOS / iOS. :func:`read_coreml_palettes`
reads the LUTs and indices back from a saved package (no Apple runtime needed), which is how
the tests check that the program reproduces our weights.

coremltools is imported lazily: nothing else in the package needs it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..model.carried import version_key
from .files import package_bytes, replace_directory
from .lut_ops import LutOp
from .tracing import as_example_tuple, exportable, exported_palettes

__all__ = [
    "convert_to_mlprogram", "export_coreml", "package_bytes",
    "read_coreml_palettes", "require_coremltools",
]

_INSTALL_HINT = 'pip install "lightning-dkm[coreml]" (coremltools >= 8.0)'


def require_coremltools() -> Any:
    """Import coremltools without its import-time notices on Linux (the missing macOS runtime
    library, untested torch / scikit-learn versions: conversion does not need either)."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError as err:
        raise ImportError(f"Core ML export needs coremltools: {_INSTALL_HINT}") from err
    finally:
        log.setLevel(level)
    return ct


def _input_types(ct: Any, example_inputs: Sequence[Tensor]) -> list[Any]:
    types = []
    for i, example in enumerate(example_inputs):  # tensors: as_example_tuple checked them
        if example.is_floating_point():
            dtype = np.float32
        elif example.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            dtype = np.int32  # Core ML has no int64 inputs
        else:
            raise ValueError(f"example_inputs[{i}] has dtype {example.dtype}; use float or int")
        types.append(ct.TensorType(name=f"input_{i}", shape=tuple(example.shape), dtype=dtype))
    return types


def convert_to_mlprogram(
    module: nn.Module,
    examples: tuple[Tensor, ...],
    inputs: list[Any] | None = None,
    minimum_deployment_target: Any = None,
    **convert_kwargs: Any,
) -> Any:
    """Trace ``module`` (already :func:`~lightning_dkm.export.tracing.exportable`) on
    ``examples`` and convert it to an in-memory ML program; nothing is written. The fit's early
    check calls this on the dense model, the export on the finalized one."""
    ct = require_coremltools()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, examples)
    return ct.convert(
        traced,
        inputs=inputs or _input_types(ct, examples),
        convert_to="mlprogram",
        minimum_deployment_target=minimum_deployment_target or ct.target.iOS18,
        **convert_kwargs,
    )


@contextmanager
def _metadata_version(module: nn.Module, palettes: Mapping[str, object]) -> Iterator[None]:
    """``ct.convert`` reads the carried palettes only under the root's
    ``_COREML_/metadata_version`` buffer; a model whose palettes were recorded on a submodule
    (``palettize(model.body)``) has none at its root. Register it there for the conversion
    only: the user's model leaves the export as it came (the same ``state_dict`` keys)."""
    added = bool(palettes) and version_key() not in module._buffers
    if added:
        module.register_buffer(version_key(), torch.tensor(1))
    try:
        yield
    finally:
        if added:
            module._buffers.pop(version_key(), None)


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor],
    *,
    minimum_deployment_target: Any = None,
    **convert_kwargs: Any,
) -> Path:
    """Write ``model`` (finalized: it carries its palettes) as an ML program ``.mlpackage``.

    Args:
        model, path, example_inputs: as for :func:`~lightning_dkm.export_coreai`, with
            ``path`` an ``.mlpackage``; the model is traced in eval mode (``torch.jit.trace``)
            and integer inputs become int32.
        minimum_deployment_target: a ``coremltools.target``; default iOS18 (what per-channel
            scales and grouped LUTs need; older targets are refused by coremltools for them).
        **convert_kwargs: passed to ``coremltools.convert`` (e.g. ``compute_units``,
            ``outputs``); ``convert_to`` is always ``"mlprogram"``.

    Returns:
        The path of the written package.

    Raises:
        ImportError: coremltools is not installed (the ``coreml`` extra).
        ValueError: a carried palette no longer matches its weight (changed after finalize),
            or unusable ``example_inputs``.
    """
    require_coremltools()
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"path must end in .mlpackage; got {str(path)!r}")
    convert_to = convert_kwargs.pop("convert_to", "mlprogram")
    if convert_to != "mlprogram":
        raise ValueError(
            f"convert_to must be 'mlprogram' (LUT ops exist only there); got {convert_to!r}"
        )
    examples = as_example_tuple(example_inputs)
    inputs = convert_kwargs.pop("inputs", None)
    with exportable(model) as module, _metadata_version(module, exported_palettes(
            module, "export_coreml")):
        mlmodel = convert_to_mlprogram(module, examples, inputs, minimum_deployment_target,
                                       **convert_kwargs)
    replace_directory(path, lambda staging: mlmodel.save(str(staging)))
    return path


def read_coreml_palettes(path: str | os.PathLike[str]) -> dict[str, LutOp]:
    """The LUT ops of a saved ``.mlpackage``, by op name (coremltools names them after the
    PyTorch parameter, ``fc.weight`` -> ``fc_weight...``); reads the package without loading
    it into the Core ML runtime, so it works on every OS."""
    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load_program(
        spec, specification_version=spec.specificationVersion,
        file_weights_dir=mlmodel.weights_dir,
    )
    ops = list(program.functions["main"].operations)
    scale_of: dict[str, tuple[np.ndarray, str]] = {}
    for op in ops:
        if op.op_type == "constexpr_blockwise_shift_scale":
            scale_of[op.outputs[0].name] = (op.scale.val, op.name)
    found: dict[str, LutOp] = {}
    for op in ops:
        if op.op_type != "constexpr_lut_to_dense":
            continue
        lut = op.lut.val
        name = op.name
        scale = None
        if lut is None:  # the LUT comes from a shift-scale op: per-channel scales
            source = op.lut.op
            lut, (scale, name) = source.data.val, scale_of[source.outputs[0].name]
            scale = scale.reshape(scale.shape[: op.indices.val.ndim])
            # coremltools expanded the LUT per channel; keep the unscaled per-palette one
        axis = None if op.vector_axis is None else int(op.vector_axis.val)
        found[name] = LutOp(name=name, bits=int(lut.shape[-2]).bit_length() - 1, lut=lut,
                            indices=op.indices.val, axis=axis, scale=scale)
    return found
