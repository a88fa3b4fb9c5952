"""Shared fixtures for the engine's specification tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    """Every test starts from the same global RNG state (module initialisers draw from it)."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator for test data."""
    return torch.Generator().manual_seed(1234)
