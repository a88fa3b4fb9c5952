"""Shared fixtures for the engine's specification tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# The native loops of the "unique" step (lightning_dkm.engine.native) are built once per test
# process into a directory of its own, not into the user's ~/.cache; subprocesses (DDP, FSDP
# fits) inherit it. An explicit LIGHTNING_DKM_CACHE is kept.
if "LIGHTNING_DKM_CACHE" not in os.environ:
    os.environ["LIGHTNING_DKM_CACHE"] = tempfile.mkdtemp(prefix="lightning_dkm-tests-")
    atexit.register(shutil.rmtree, os.environ["LIGHTNING_DKM_CACHE"], ignore_errors=True)

# pytest-xdist (``-n``): these modules build an expensive module-scoped fixture (fits, exports)
# that their tests share, so each runs whole on one worker; every other test is handed out alone.
# (xdist's own ``xdist_group`` mark does not group under pytest 9.2: it renames
# ``item._nodeid``, which pytest no longer reads.)
WHOLE_MODULES = frozenset({
    "test_coreai.py", "test_coreml.py", "test_fsdp_callback.py", "test_resume.py",
    "test_tensorboard.py",
})


class _Scheduling:
    """The ``pytest_xdist_make_scheduler`` of ``--dist load`` (the default with ``-n``)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getvalue("dist") != "load":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class WholeModulesScheduling(LoadScopeScheduling):
            """One test a unit, except a module in WHOLE_MODULES: one unit (units with the
            most tests go first)."""

            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                return module if module.rsplit("/", 1)[-1] in WHOLE_MODULES else nodeid

        return WholeModulesScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_Scheduling(), "lightning_dkm_xdist_scheduling")
    # Each xdist worker is a process of its own: it takes its share of the machine's cores for
    # torch's intra-op threads, so that N workers do not each start one thread per core.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    """Every test starts from the same global RNG state (module initialisers draw from it)."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator for test data."""
    return torch.Generator().manual_seed(1234)
