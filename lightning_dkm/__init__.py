"""lightning_dkm: train-time weight clustering with Differentiable K-Means (DKM).

The engine (``kmeans``, ``dkm``, ``layout``, ``parametrize``) is plain PyTorch; the Lightning
callback builds on it.
"""

from .engine.bitpack import pack_bits, unpack_bits
from .engine.layout import ClusterSpec, PaletteLayout
from .engine.palette import Palette
from .engine.parametrization import DKMParametrization
from .export.artifact import (
    inspect_artifact,
    load_compressed,
    read_metadata,
    read_palettes,
    save_compressed,
)
from .export.coreml import export_coreml, read_coreml_palettes
from .export.energy import EnergyModel, count_macs
from .export.packed import pack, unpack
from .export.report import CompressionReport, EnergyEstimate, LayerReport, TensorReport
from .model.attach import ClusteredTensor, attach, clustered_tensors, finalize
from .model.carried import (
    carried_palettes,
    carry_palettes,
    discard_palettes,
    expect_carried_buffers,
)
from .model.post_training import fisher_diagonal, palettize
from .model.targets import Target, select_targets

__all__ = [
    "ClusterSpec",
    "ClusteredTensor",
    "CompressionReport",
    "DKMCallback",
    "DKMParametrization",
    "EnergyEstimate",
    "EnergyModel",
    "LayerReport",
    "Palette",
    "PaletteLayout",
    "Target",
    "TensorReport",
    "attach",
    "carried_palettes",
    "carry_palettes",
    "clustered_tensors",
    "count_macs",
    "discard_palettes",
    "expect_carried_buffers",
    "export_coreml",
    "finalize",
    "fisher_diagonal",
    "inspect_artifact",
    "load_compressed",
    "pack",
    "pack_bits",
    "palettize",
    "read_coreml_palettes",
    "read_metadata",
    "read_palettes",
    "save_compressed",
    "select_targets",
    "unpack",
    "unpack_bits",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports Lightning (seconds); the plain-PyTorch engine should not pay for it.
    if name == "DKMCallback":
        from .lightning.callback import DKMCallback

        return DKMCallback
    raise AttributeError(f"module 'lightning_dkm' has no attribute {name!r}")
