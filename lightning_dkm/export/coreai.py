"""Core AI export: a finalized model as an ``.aimodel`` whose clustered weights are LUT ops,
run in Core AI's runtime and compared with PyTorch before it is called done.

Core AI is Apple's on-device stack from iOS / macOS 27. ``coreai-torch`` converts a
``torch.export`` program, ``coreai-core`` holds the runtime, which also runs on Linux (the
``coreai`` extra: ``pip install "lightning-dkm[coreai]"``). For every palette the model carries
(:mod:`lightning_dkm.model.carried`), :func:`export_coreai` re-expresses the weight as Core AI's
own op, ``torch.ops.coreai.lut_to_dense(indices, lut, axis)`` on our indices and LUT, followed
by ``torch.ops.coreai.constexpr_blockwise_shift_scale`` where the tensor has per-channel
scales; the converter keeps both as constant-folded LUT ops, so the package stores our palettes
entry for entry (per tensor, per ``group_size`` block, ``cluster_dim``-vectors along the
vector axis) with indices packed at their width.

coreai-torch packs indices of 1, 2, 4, 6 and 8 bits (:data:`COREAI_BITS`); a tensor clustered
at another width is refused before anything is written, with the tensors and the widths that
work. After writing, the package is loaded in coreai-core's runtime, run on the example inputs
and compared with the PyTorch model: the largest difference is returned
(:class:`CoreAIExport`), and a difference beyond float tolerance is an error, since Apple's
tracker shows palettized exports that convert cleanly and compute the wrong thing.

coreai-torch and coreai-core are imported lazily: nothing else in the package needs them.
Private names used, each pinned by the ``coreai`` extra's ranges (coreai-torch 0.4, coreai-core
1.0 betas) and covered by tests: ``coreai_torch._compression.custom_layers`` (imported only to
register ``torch.ops.coreai.*``, as coreai-opt itself does), and, to read LUT ops back,
``AIProgram._module`` (the MLIR module; coreai-core has no public op walker yet).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..engine.bitpack import packed_size, unpack_bits
from ..engine.palette import Palette
from .files import package_bytes, replace_directory
from .lut_ops import LutOp
from .tracing import as_example_tuple, exportable, exported_palettes

__all__ = [
    "COREAI_BITS",
    "CoreAIExport",
    "check_packable",
    "convert_to_coreai",
    "export_coreai",
    "lut_op_names",
    "match_lut_ops",
    "package_bytes",
    "read_coreai_palettes",
    "require_coreai",
    "run_coreai",
]

#: Index widths coreai-torch 0.4 can pack (3, 5 and 7 bits fail inside it).
COREAI_BITS = (1, 2, 4, 6, 8)
_METADATA_KEY = "lightning_dkm"
_INSTALL_HINT = 'pip install "lightning-dkm[coreai]" (coreai-torch >= 0.4.3, coreai-core)'


def require_coreai() -> Any:
    """Import coreai-torch (which registers the ``torch.ops.coreai`` ops) and return it."""
    try:
        with warnings.catch_warnings():
            # coreai-torch 0.4.3 compares "2.13.0+cpu" > "2.13.0" and warns that the torch it
            # was validated with is not this one; it is (the local build tag aside).
            warnings.filterwarnings("ignore", "coreai-torch has only been validated",
                                    UserWarning)
            import coreai_torch

            # registers torch.ops.coreai.*: the import Apple's coreai-opt makes for the same
            # reason
            import coreai_torch._compression.custom_layers
    except ImportError as err:
        raise ImportError(f"Core AI export needs coreai-torch and coreai-core: {_INSTALL_HINT}"
                          ) from err
    return coreai_torch


def check_packable(bits: dict[str, int], what: str) -> None:
    """A ``ValueError`` starting with ``what`` unless every ``{tensor name: bits}`` has a width
    whose indices Core AI holds (:data:`COREAI_BITS`): the export's check, and the callback's
    at setup."""
    bad = {name: b for name, b in bits.items() if b not in COREAI_BITS}
    if bad:
        listed = ", ".join(f"{name} ({b} bits)" for name, b in sorted(bad.items()))
        raise ValueError(
            f"{what}: Core AI packs LUT indices of {list(COREAI_BITS)} bits only; {listed} "
            f"cannot be exported. Cluster these tensors at one of {list(COREAI_BITS)} bits "
            "(e.g. overrides={<name>: {bits: 4}})"
        )


# -- the model re-expressed with Core AI's LUT ops ----------------------------------------------
class _LutToDense(nn.Module):
    """A parametrization that ignores the dense weight and rebuilds it from the palette with
    Core AI's ops (buffers named ``indices`` / ``lut`` / ``scale``, as coreai-torch expects)."""

    def __init__(self, palette: Palette, dtype: torch.dtype) -> None:
        super().__init__()
        layout, cast = palette.layout, palette.to(dtype=dtype)  # never a silent inf
        self.register_buffer("indices", palette.index_grid().to(torch.uint8).contiguous())
        self.register_buffer("lut", layout.broadcast_lut(cast.lut.detach()))
        self.axis = layout.vector_axis
        self.register_buffer("scale", None if cast.scale is None else
                             layout.broadcast_scale(cast.scale.detach()))

    def forward(self, _dense: Tensor) -> Tensor:
        weight = torch.ops.coreai.lut_to_dense(self.indices, self.lut, self.axis)
        if self.scale is not None:
            weight = torch.ops.coreai.constexpr_blockwise_shift_scale(weight, self.scale)
        return weight


@contextmanager
def _lut_weights(module: nn.Module, palettes: dict[str, Palette]) -> Iterator[None]:
    """Inside the block every clustered weight of ``module`` (and every alias of it: a tied
    weight is one palette) is computed by :class:`_LutToDense`; on exit the Parameters are back,
    the same objects, untouched."""
    aliases: dict[int, list[tuple[nn.Module, str]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        aliases.setdefault(id(param), []).append((module.get_submodule(owner), leaf))
    done: list[tuple[nn.Module, str]] = []
    try:
        for name, palette in palettes.items():
            param = module.get_parameter(name)
            lut = _LutToDense(palette, param.dtype)
            for owner, leaf in aliases[id(param)]:
                if parametrize.is_parametrized(owner, leaf):
                    raise ValueError(
                        f"{name}: the weight is already parametrized "
                        f"({type(owner.parametrizations[leaf][0]).__name__}); export the "
                        "finalized model, whose weights are plain Parameters"
                    )
                parametrize.register_parametrization(owner, leaf, lut, unsafe=True)
                done.append((owner, leaf))
        yield
    finally:
        for owner, leaf in reversed(done):
            parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)


def convert_to_coreai(module: nn.Module, examples: tuple[Tensor, ...]) -> Any:
    """``torch.export`` ``module`` (already :func:`~lightning_dkm.export.tracing.exportable`)
    on ``examples``, decompose it as coreai-torch asks and convert it to an in-memory
    ``AIProgram``; nothing is written. The fit's early check calls this on the dense model,
    :func:`export_coreai` on the model with LUT weights."""
    coreai_torch = require_coreai()
    program = torch.export.export(module, examples)
    program = program.run_decompositions(coreai_torch.get_decomp_table())
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    return converter.add_exported_program(program).to_coreai()


# -- running a package --------------------------------------------------------------------------
def _run_coroutine(coroutine: Any) -> Any:
    """Run ``coroutine`` to completion, also when the caller is inside an event loop (Jupyter):
    then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _runtime_input(example: Tensor, dtype: str) -> np.ndarray:
    """``example`` as the array the package's input takes (its dtype: Core AI has no int64
    inputs, so integer inputs arrive as int32)."""
    array = example.detach().cpu()
    if array.dtype == torch.bfloat16:
        array = array.float()
    return np.ascontiguousarray(array.numpy().astype(np.dtype(dtype), copy=False))


def run_coreai(path: str | os.PathLike[str], example_inputs: Tensor | Sequence[Tensor]
               ) -> list[np.ndarray]:
    """Load the ``.aimodel`` at ``path`` in coreai-core's runtime (on Linux too), run its
    ``main`` function on ``example_inputs`` (positional, in the package's input order) and
    return its outputs in order, as numpy arrays."""
    require_coreai()
    from coreai.authoring import AIModelAsset
    from coreai.runtime import NDArray

    examples = as_example_tuple(example_inputs)

    async def run() -> list[np.ndarray]:
        asset = AIModelAsset.load(Path(path))
        async with asset.executable() as model:
            function = model.load_function("main")
            names = function.desc.input_names
            if len(names) != len(examples):
                raise ValueError(
                    f"{path}: the package takes {len(names)} inputs ({names}); got "
                    f"{len(examples)} example inputs"
                )
            inputs = {
                name: NDArray(_runtime_input(x, function.desc.input_descriptor(name).dtype))
                for name, x in zip(names, examples, strict=True)
            }
            outputs = await function(inputs)
            return [np.asarray(outputs[name].numpy()) for name in function.desc.output_names]

    return _run_coroutine(run())


def _flat_outputs(output: Any) -> list[Tensor]:
    """A model's outputs in ``torch.export``'s order (tensors of nested tuples / lists /
    dicts, depth first)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [leaf for item in output for leaf in _flat_outputs(item)]
    return []


@dataclass(frozen=True)
class CoreAIExport:
    """What :func:`export_coreai` wrote and measured.

    Attributes:
        path: the ``.aimodel`` directory.
        package_bytes: its size on disk.
        lut_ops: how many LUT ops (clustered tensors) it holds.
        max_abs_difference: the largest ``|runtime - PyTorch|`` over every output element on
            the example inputs.
        max_abs_output: the largest ``|PyTorch output|`` (the scale of the difference).
        tolerance: the difference allowed (``atol + rtol * max_abs_output``).
    """

    path: Path
    package_bytes: int
    lut_ops: int
    max_abs_difference: float
    max_abs_output: float
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the path as a string)."""
        return {**asdict(self), "path": str(self.path)}


def export_coreai(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | Sequence[Tensor],
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> CoreAIExport:
    """Write ``model`` (finalized: it carries its palettes) as a Core AI ``.aimodel``, run it in
    coreai-core's runtime on ``example_inputs`` and compare with PyTorch.

    Args:
        model: a finalized model (after :func:`~lightning_dkm.finalize`,
            :func:`~lightning_dkm.palettize` or :func:`~lightning_dkm.load_compressed`): a plain
            ``nn.Module`` or a ``LightningModule`` (inside or outside a Trainer), also behind
            ``torch.compile`` or DDP; exported in eval mode with ``torch.export``.
        path: the ``.aimodel`` directory to write; replaced if it exists (the new package is
            written beside it first, so a failed export leaves the old one).
        example_inputs: one tensor or a sequence of them, the model's positional inputs; their
            shapes become the package's (static) input shapes.
        verify: run the written package and compare (default). ``False`` only writes it
            (``max_abs_difference`` is then NaN).
        rtol, atol: the allowed difference, ``atol + rtol * max|PyTorch output|`` (float32
            arithmetic in another order than PyTorch's stays far inside it).

    Returns:
        A :class:`CoreAIExport`: the path, its size, the number of LUT ops and the measured
        difference.

    Raises:
        ImportError: coreai-torch / coreai-core are not installed (the ``coreai`` extra).
        ValueError: ``path`` does not end in ``.aimodel``; a tensor clustered at a width Core AI
            cannot pack (before anything is written); a carried palette that no longer matches
            its weight; unusable ``example_inputs``; or the package's outputs differ from
            PyTorch's beyond the tolerance (the package stays on disk for inspection).
    """
    require_coreai()
    path = Path(path)
    if path.suffix != ".aimodel":
        raise ValueError(f"path must end in .aimodel; got {str(path)!r}")
    if rtol < 0 or atol < 0 or math.isnan(rtol) or math.isnan(atol):
        raise ValueError(f"rtol and atol must be >= 0; got rtol={rtol}, atol={atol}")
    examples = as_example_tuple(example_inputs)
    with exportable(model) as module:
        palettes = exported_palettes(module, "export_coreai")
        check_packable({n: p.layout.spec.bits for n, p in palettes.items()}, "export_coreai")
        reference = ([t.detach().float().cpu().numpy() for t in _flat_outputs(module(*examples))]
                     if verify else [])
        with _lut_weights(module, palettes):
            program = convert_to_coreai(module, examples)
    replace_directory(path, lambda staging: _save(program, staging, palettes))
    size = package_bytes(path)
    if not verify:
        return CoreAIExport(path, size, len(palettes), math.nan, math.nan, math.nan)
    outputs = run_coreai(path, examples)
    if len(outputs) != len(reference):
        raise ValueError(
            f"{path}: the package returns {len(outputs)} outputs, the PyTorch model "
            f"{len(reference)}"
        )
    difference = max((float(np.max(np.abs(o.astype(np.float64) - r))) if r.size else 0.0
                      for o, r in zip(outputs, reference, strict=True)), default=0.0)
    scale = max((float(np.max(np.abs(r))) if r.size else 0.0 for r in reference), default=0.0)
    tolerance = atol + rtol * scale
    if not difference <= tolerance:  # NaN fails too
        raise ValueError(
            f"{path}: Core AI's runtime computes outputs that differ from PyTorch's by up to "
            f"{difference:.3g} (allowed {tolerance:.3g} = atol {atol:g} + rtol {rtol:g} x "
            f"max |output| {scale:.3g}) on the example inputs; the package is left on disk for "
            "inspection (lightning-dkm coreai PATH)"
        )
    return CoreAIExport(path, size, len(palettes), difference, scale, tolerance)


def _save(program: Any, path: Path, palettes: dict[str, Palette]) -> None:
    """Save ``program`` at ``path``, check that its LUT ops hold ``palettes`` exactly and
    record which op is which tensor in the package's metadata (``lightning_dkm.lut_ops``)."""
    asset = program.save_asset(path)
    names = match_lut_ops(palettes, read_coreai_palettes(path))
    asset.update_metadata(lambda metadata: metadata.set_custom(
        _METADATA_KEY, {"lut_ops": names, "version": 1}))


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Both absent, or equal in shape and in every value (compared exactly, across dtypes)."""
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def match_lut_ops(palettes: dict[str, Palette], ops: list[LutOp]) -> list[str | None]:
    """The tensor name of every LUT op (``None`` for an op none of ``palettes`` is), matched
    by exact equality of LUT, indices, axis and scales.

    Raises:
        ValueError: a palette that no op holds exactly (the converter changed it).
    """
    names: list[str | None] = [None] * len(ops)
    for name, palette in palettes.items():
        module = _LutToDense(palette, palette.lut.dtype)
        lut, indices = module.lut.float().cpu().numpy(), module.indices.cpu().numpy()
        scale = None if module.scale is None else module.scale.float().cpu().numpy()
        for i, op in enumerate(ops):
            if names[i] is None and op.axis == module.axis and _same(op.indices, indices) \
                    and _same(op.lut, lut) and _same(op.scale, scale):
                names[i] = name
                break
        else:
            raise ValueError(
                f"{name}: no LUT op of the Core AI package holds its palette exactly (the "
                "converter changed its LUT, indices or scales)"
            )
    return names


def lut_op_names(path: str | os.PathLike[str]) -> list[str | None]:
    """The tensor names :func:`export_coreai` recorded for the package's LUT ops, in op order
    (empty when the package was written by something else)."""
    require_coreai()
    from coreai.authoring import AIModelAsset

    metadata = AIModelAsset.load(Path(path)).metadata
    # coreai-core 1.0.0b3 names it creator_defined_metadata (its stub: custom_metadata)
    custom = getattr(metadata, "creator_defined_metadata", None)
    if custom is None:
        custom = getattr(metadata, "custom_metadata", {})
    custom = custom.get(_METADATA_KEY) or {}
    names = custom.get("lut_ops", [])
    return [n if isinstance(n, str) else None for n in names] if isinstance(names, list) else []


# -- reading the LUT ops back -------------------------------------------------------------------
_TENSOR_TYPE = re.compile(r"tensor<((?:\d+x)*)([a-z]+)(\d+)>")
_NUMPY_DTYPES = {("f", 32): np.float32, ("f", 16): np.float16,
                 ("si", 16): np.int16, ("si", 32): np.int32, ("si", 64): np.int64,
                 ("i", 32): np.int32, ("i", 64): np.int64}


def _parse_type(text: str) -> tuple[tuple[int, ...], str, int]:
    match = _TENSOR_TYPE.fullmatch(text)
    if match is None:
        raise ValueError(f"unexpected tensor type {text!r}")
    dims, kind, width = match.groups()
    shape = tuple(int(d) for d in dims.split("x") if d)
    return shape, kind, int(width)


def _constant(value: Any, resources: dict[str, bytes]) -> np.ndarray:
    """The numpy value of a ``coreai.constant`` result (inline dense or a resource blob)."""
    shape, kind, width = _parse_type(str(value.type))
    attr = value.owner.attributes["value"]
    text = str(attr)
    count = math.prod(shape)
    if text.startswith("dense_resource<"):
        blob = resources[text[len("dense_resource<"):text.index(">")]]
        if kind == "ui":  # packed least significant bit first, as engine.bitpack packs
            packed = bytearray(blob[:packed_size(count, width)])
            indices = unpack_bits(torch.frombuffer(packed, dtype=torch.uint8), width, count)
            return indices.to(torch.uint8).numpy().reshape(shape)
        dtype = _NUMPY_DTYPES.get((kind, width))
        if dtype is None:
            raise ValueError(f"cannot read a constant of type {value.type}")
        return np.frombuffer(blob, dtype=dtype, count=count).reshape(shape).copy()
    array = np.array(attr)
    return np.broadcast_to(array, shape).copy() if array.size != count else array.reshape(shape)


def _resources(program_text: str) -> dict[str, bytes]:
    """The resource blobs of a printed module, by name (without MLIR's 4-byte alignment
    header)."""
    return {name: bytes.fromhex(hex_data)[4:]
            for name, hex_data in re.findall(r'(\w+): "0x([0-9A-Fa-f]*)"', program_text)}


def _operations(program: Any) -> list[Any]:
    ops = []
    for graph in program._module._mlir_module.body.operations:
        for region in graph.regions:
            for block in region.blocks:
                ops.extend(block.operations)
    return ops


def read_coreai_palettes(path: str | os.PathLike[str]) -> list[LutOp]:
    """The LUT ops of a saved ``.aimodel``, in program order, read from its program (no runtime
    needed); a ``constexpr_blockwise_shift_scale`` applied to an op's output is its scale.

    Raises:
        ValueError: ``path`` is not a Core AI package.
    """
    require_coreai()
    from coreai.authoring import AIModelAsset

    path = Path(path)
    if not AIModelAsset.is_valid(path):
        raise ValueError(f"{path} is not a Core AI package (.aimodel directory)")
    program = AIModelAsset.load(path).program
    resources = _resources(str(program))
    ops = _operations(program)
    scales: dict[str, np.ndarray] = {}  # by the name of the value the scale multiplies
    for op in ops:
        if op.name in ("coreai.blockwise_shift_scale", "coreai.constexpr_blockwise_shift_scale"):
            scales[op.operands[0].get_name()] = _constant(op.operands[1], resources)
    found = []
    for op in ops:
        if op.name != "coreai.lut_to_dense":
            continue
        indices_value, lut_value, axis_value = op.operands[:3]
        _, _, bits = _parse_type(str(indices_value.type))
        found.append(LutOp(
            name=f"lut_to_dense #{len(found)}", bits=bits,
            lut=_constant(lut_value, resources), indices=_constant(indices_value, resources),
            axis=int(_constant(axis_value, resources)),
            scale=scales.get(op.results[0].get_name()),
        ))
    return found
