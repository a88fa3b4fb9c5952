"""lightning_dkm: train-time weight clustering with Differentiable K-Means (DKM).

Four layers (``docs/architecture.md``): ``engine`` (plain PyTorch: k-means, the palette layout,
the one weighted DKM core, the parametrization), ``model`` (targets, attach / finalize,
post-training k-means, methods, checkpoints), ``export`` (artifact, packed inference, Core ML,
Core AI, report) and ``lightning`` (:class:`DKMCallback`). Every public name is importable
from here.
"""

from .engine.bitpack import pack_bits, unpack_bits
from .engine.clustering_pass import clustering_pass
from .engine.layout import ClusterSpec, PaletteLayout
from .engine.palette import Palette
from .engine.parametrization import DKMParametrization
from .export.artifact import (
    ReportMismatchWarning,
    inspect_artifact,
    load_compressed,
    read_metadata,
    read_palettes,
    save_compressed,
)
from .export.coreai import CoreAIExport, export_coreai, read_coreai_palettes
from .export.coreml import export_coreml, read_coreml_palettes
from .export.energy import EnergyModel, count_macs
from .export.packed import pack, unpack
from .export.report import CompressionReport, EnergyEstimate, LayerReport, TensorReport
from .model.attach import ClusteredTensor, attach, clustered_tensors, finalize, release
from .model.carried import (
    carried_palettes,
    carry_palettes,
    discard_palettes,
    expect_carried_buffers,
)
from .model.checkpoint import join_dkm_state, split_dkm_state
from .model.post_training import fisher_diagonal, palettize
from .model.targets import Target, select_targets

__all__ = [
    "AtomicCheckpointIO",
    "ClusterSpec",
    "ClusteredTensor",
    "CompressionReport",
    "CoreAIExport",
    "DKMCallback",
    "DKMParametrization",
    "EnergyEstimate",
    "EnergyModel",
    "LayerReport",
    "Palette",
    "PaletteLayout",
    "ReportMismatchWarning",
    "Target",
    "TensorReport",
    "attach",
    "carried_palettes",
    "carry_palettes",
    "clustered_tensors",
    "clustering_pass",
    "count_macs",
    "discard_palettes",
    "expect_carried_buffers",
    "export_coreai",
    "export_coreml",
    "finalize",
    "fisher_diagonal",
    "inspect_artifact",
    "join_dkm_state",
    "load_compressed",
    "pack",
    "pack_bits",
    "palettize",
    "read_coreai_palettes",
    "read_coreml_palettes",
    "read_metadata",
    "read_palettes",
    "release",
    "save_compressed",
    "select_targets",
    "split_dkm_state",
    "unpack",
    "unpack_bits",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports Lightning (seconds); the plain-PyTorch engine should not pay for it.
    if name == "DKMCallback":
        from .lightning.callback import DKMCallback

        return DKMCallback
    if name == "AtomicCheckpointIO":
        from .lightning.checkpoint_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module 'lightning_dkm' has no attribute {name!r}")
