"""lightning_dkm's engine inside other tools: a layer above ``engine``, ``model`` and ``export``
that none of them imports.

:mod:`.coreai_opt` registers DKM as a training strategy of Apple's coreai-opt. coreai-opt finds
it through the ``coreai_opt.plugins`` entry point, which names :func:`register_coreai_opt`.
"""

from __future__ import annotations

import importlib

__all__ = ["register_coreai_opt"]


def register_coreai_opt() -> None:
    """coreai-opt's plugin hook (``[project.entry-points."coreai_opt.plugins"]``): importing
    :mod:`lightning_dkm.integrations.coreai_opt` registers the ``"lightning_dkm"`` training
    strategy. coreai-opt calls this at the end of ``import coreai_opt``.

    The hook lives here, not in that module, because that module imports coreai-opt: a user who
    imports it first sets off ``import coreai_opt``, which calls this hook while the module is
    still loading. ``import_module`` then returns the loading module (it registers the strategy
    itself when it finishes) instead of failing on a name it has not defined yet. It costs the
    import of the engine and of pydantic, never Lightning.
    """
    importlib.import_module(f"{__name__}.coreai_opt")
