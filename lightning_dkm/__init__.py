"""lightning_dkm: train-time weight clustering with Differentiable K-Means (DKM).

The engine (``kmeans``, ``dkm``, ``layout``, ``parametrize``) is plain PyTorch; the Lightning
callback builds on it.
"""

from .artifact import (
    inspect_artifact,
    load_compressed,
    read_metadata,
    read_palettes,
    save_compressed,
)
from .bitpack import pack_bits, unpack_bits
from .carried import carried_palettes, carry_palettes, discard_palettes, expect_carried_buffers
from .clustering import ClusteredTensor, attach, clustered_tensors, finalize
from .coreml import export_coreml, read_coreml_palettes
from .energy import EnergyModel, count_macs
from .layout import ClusterSpec, PaletteLayout
from .packed import pack, unpack
from .palette import Palette
from .palettize import fisher_diagonal, palettize
from .parametrize import DKMParametrization
from .report import CompressionReport, EnergyEstimate, LayerReport, TensorReport
from .targets import Target, select_targets

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
        from .callback import DKMCallback

        return DKMCallback
    raise AttributeError(f"module 'lightning_dkm' has no attribute {name!r}")
