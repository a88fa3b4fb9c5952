"""Tests of an optional extra skip where it is not installed, and fail where it must be.

``pytest`` in an environment with only the package and its ``dev`` tools skips the tests of the
``coreml``, ``coreai`` and ``coreai-opt`` extras, naming the extra. The README's test command
(``bash scripts/dev.sh test``) installs every extra and sets ``LIGHTNING_DKM_REQUIRE_EXTRAS=1``:
there a missing extra fails the test instead, so that a broken install cannot pass as skips.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from types import ModuleType

import pytest
from packaging.requirements import Requirement

#: Set by ``scripts/dev.sh test``: a missing extra is an error, not a skip.
REQUIRE_EXTRAS = "LIGHTNING_DKM_REQUIRE_EXTRAS"

#: The module that stands for each optional extra of pyproject.toml.
EXTRA_OF_MODULE = {
    "coremltools": "coreml",
    "coreai_torch": "coreai",
    "coreai_core": "coreai",
    "coreai_opt": "coreai-opt",
    "sklearn": "dev",
}


def extra_required(extra: str) -> bool:
    """Whether a missing ``extra`` fails a test here rather than skipping it: under
    ``LIGHTNING_DKM_REQUIRE_EXTRAS=1``, where the package's own metadata says the extra installs
    something on this Python (pyproject.toml's markers: coreai's packages need Python 3.11)."""
    return os.environ.get(REQUIRE_EXTRAS) == "1" and _installs_here(extra)


def _installs_here(extra: str) -> bool:
    try:
        declared = importlib.metadata.requires("lightning-dkm") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree: assume it does
        return True
    here = {"extra": extra, "python_version": "{}.{}".format(*sys.version_info[:2])}
    markers = (Requirement(line).marker for line in declared)
    return any(marker is not None and marker.evaluate(here) for marker in markers)


def need(module: str) -> ModuleType:
    """Import ``module`` of an optional extra, or skip the test (or the whole test module, when
    called at its top) where it is not installed; under ``LIGHTNING_DKM_REQUIRE_EXTRAS=1`` fail
    instead."""
    extra = EXTRA_OF_MODULE[module]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = (f"{module} is not installed (the {extra} extra: "
                   f"pip install \"lightning-dkm[{extra}]\"): {error}")
        if extra_required(extra):
            pytest.fail(f"{message}; {REQUIRE_EXTRAS}=1 requires every extra", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def missing_extra_behind(error: BaseException) -> str | None:
    """The optional module whose absence caused ``error`` (anywhere in its chain of causes), if
    that module is indeed not installed; else None."""
    missing, visited = set(), set()
    link: BaseException | None = error
    while link is not None and id(link) not in visited:
        visited.add(id(link))
        if isinstance(link, ModuleNotFoundError) and link.name:
            missing.add(link.name.split(".")[0])
        # as a traceback shows it: the explicit cause, else the context unless suppressed
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    for module in sorted(missing & EXTRA_OF_MODULE.keys()):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None
