"""The ddp_spawn handoff: what rank 0 of a spawned fit leaves for the process that called fit.

Under ``ddp_spawn`` the launching process holds its own copy of ``DKMCallback`` and gets only
the weights back from Lightning. Rank 0 therefore writes its outputs' paths, the palettes and the
statistics to a file (tensors and primitives only, so :func:`read_handoff` can use
``torch.load(weights_only=True)``; written atomically), and the launcher's callback adopts them
the first time they are asked for. Nothing here imports Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..engine.layout import PaletteLayout
from ..engine.palette import Palette
from ..export.files import write_atomically

__all__ = ["discard_handoff", "read_handoff", "write_handoff"]


def write_handoff(
    path: Path,
    paths: dict[str, Path],
    palettes: dict[str, Palette],
    stats: dict[str, dict[str, float]],
) -> None:
    """Rank 0 of a spawned fit: the outputs, palettes and statistics, as tensors and primitives
    only (so the reader can use ``torch.load(weights_only=True)``), written atomically."""
    payload = {
        "paths": {key: str(value) for key, value in paths.items()},
        "stats": stats,
        "palettes": {
            name: {
                "layout": palette.layout.to_dict(),
                "lut": palette.lut.detach().cpu(),
                "indices": palette.indices.detach().cpu(),
                "scale": None if palette.scale is None else palette.scale.detach().cpu(),
            }
            for name, palette in palettes.items()
        },
    }
    write_atomically({path: lambda tmp: torch.save(payload, tmp)})


def read_handoff(path: Path) -> dict[str, Any]:
    payload = torch.load(path, weights_only=True)
    palettes = {
        name: Palette(entry["lut"], entry["indices"],
                      PaletteLayout.from_dict(entry["layout"], name), scale=entry["scale"])
        for name, entry in payload["palettes"].items()
    }
    return {
        "paths": {key: Path(value) for key, value in payload["paths"].items()},
        "palettes": palettes,
        "stats": payload["stats"],
    }


def discard_handoff(path: Path, launcher_pid: int) -> None:
    """Remove a handoff nobody read, from the launching process only (a forked worker that
    exits must not delete what it just left for the launcher)."""
    if os.getpid() == launcher_pid:
        path.unlink(missing_ok=True)
