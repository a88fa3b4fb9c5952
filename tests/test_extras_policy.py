"""How tests of an optional extra behave where it is missing (tests/extras.py): a skip that
names the extra, or, under the README's test command, a failure."""

from __future__ import annotations

import sys

import pytest
from extras import REQUIRE_EXTRAS, missing_extra_behind, need

Skipped = pytest.skip.Exception
Failed = pytest.fail.Exception


@pytest.fixture
def coremltools_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import raises ModuleNotFoundError


def test_a_missing_extra_skips_naming_the_extra_and_its_install(monkeypatch, coremltools_missing):
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    with pytest.raises(Skipped, match=r'the coreml extra: pip install "lightning-dkm\[coreml\]"'):
        need("coremltools")


def test_a_missing_extra_fails_where_the_test_command_requires_every_extra(
        monkeypatch, coremltools_missing):
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    with pytest.raises(Failed, match=f"coremltools is not installed.*{REQUIRE_EXTRAS}=1"):
        need("coremltools")


def test_an_extra_for_newer_pythons_is_never_required_below_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "coreai_torch", None)
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    monkeypatch.setattr(sys, "version_info", (3, 10, 14))
    with pytest.raises(Skipped, match="the coreai extra"):
        need("coreai_torch")


def test_an_installed_extra_is_returned():
    assert need("sklearn").__name__ == "sklearn"


def test_an_error_is_put_down_to_a_missing_extra_through_its_chain_of_causes(
        coremltools_missing):
    def export():
        try:
            import coremltools  # noqa: F401
        except ImportError as err:
            raise ImportError("Core ML export needs coremltools") from err

    with pytest.raises(RuntimeError) as raised:
        try:
            export()
        except ImportError as err:
            raise RuntimeError("DKMCallback(export_coreml=True) needs the coreml extra") from err
    assert missing_extra_behind(raised.value) == "coremltools"


def test_an_error_raised_from_none_is_not_put_down_to_the_extra_it_hid(coremltools_missing):
    with pytest.raises(RuntimeError) as raised:
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise RuntimeError("unrelated") from None
    assert missing_extra_behind(raised.value) is None


def test_an_error_of_an_installed_module_or_of_no_module_is_not_put_down_to_an_extra():
    assert missing_extra_behind(ValueError("bad value")) is None
    assert missing_extra_behind(ModuleNotFoundError("x", name="sklearn")) is None  # installed
    assert missing_extra_behind(ModuleNotFoundError("x", name="not_an_extra")) is None
