"""lightning_dkm: train-time weight clustering with Differentiable K-Means (DKM).

The engine (``kmeans``, ``dkm``, ``layout``, ``parametrize``) is plain PyTorch; the Lightning
callback builds on it.
"""

from .clustering import ClusteredTensor, attach, clustered_tensors, finalize
from .layout import ClusterSpec, PaletteLayout
from .palette import Palette
from .palettize import palettize
from .parametrize import DKMParametrization
from .targets import Target, select_targets

__all__ = [
    "ClusterSpec",
    "ClusteredTensor",
    "DKMParametrization",
    "Palette",
    "PaletteLayout",
    "Target",
    "attach",
    "clustered_tensors",
    "finalize",
    "palettize",
    "select_targets",
]

__version__ = "0.1.0"
