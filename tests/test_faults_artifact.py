"""Faults around the artifact file: a save interrupted midway, and files that are not (whole)
artifacts. Each must leave the user with the previous file or a clear error naming the file and
what is wrong, never a truncated artifact or a bare safetensors/torch exception.

The reference model and its helpers come from ``test_artifact``.
"""

from __future__ import annotations

import errno
import os
import re
import stat

import pytest
import torch
from plain_models import WithBatchNorm as Net
from safetensors import safe_open
from safetensors.torch import save, save_file
from test_artifact import assert_same_state, finalized, rewrite

from lightning_dkm import load_compressed, read_palettes, save_compressed
from lightning_dkm.export import artifact as artifact_module


def failing_midway(monkeypatch) -> None:
    """Make the artifact writer write half of the file, then fail as a full disk would."""

    def half_then_fail(tensors, filename, metadata=None) -> None:
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact_module, "save_file", half_then_fail)


# -- interrupted saves ------------------------------------------------------------------------


def test_a_save_failing_midway_keeps_the_previous_artifact_and_no_temp_file(
    tmp_path, monkeypatch
) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes, lut_dtype=torch.float32)
    previous = path.read_bytes()
    failing_midway(monkeypatch)
    other, other_palettes = finalized(Net())
    with pytest.raises(OSError, match="No space left"):
        save_compressed(other, path, other_palettes)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    fresh = Net()
    load_compressed(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_a_first_save_failing_midway_leaves_no_file_at_all(tmp_path, monkeypatch) -> None:
    model, palettes = finalized()
    failing_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_compressed(model, tmp_path / "m.safetensors", palettes)
    assert list(tmp_path.iterdir()) == []


def test_the_artifact_is_flushed_to_disk_before_it_replaces_the_previous_one(
    tmp_path, monkeypatch
) -> None:
    """fsync before os.replace: after a power cut the new name never points at unwritten
    data."""
    model, palettes = finalized()
    path = tmp_path / "m.safetensors"
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", stat.S_ISREG(info.st_mode), info.st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_compressed(model, path, palettes)
    replaced = events.index(("replace", os.fspath(path)))
    assert ("fsync", True, path.stat().st_size) in events[:replaced]


def test_a_failing_fsync_keeps_the_previous_artifact_and_no_temp_file(
    tmp_path, monkeypatch
) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    previous = path.read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        save_compressed(model, path, palettes, lut_dtype=torch.float32)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_new_artifact_gets_the_usual_file_mode_and_a_replaced_one_keeps_its_own(
    tmp_path,
) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open(path, "w") makes it
    path.chmod(0o640)
    save_compressed(model, path, palettes, lut_dtype=torch.float32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_saving_into_a_missing_directory_names_it(tmp_path) -> None:
    model, palettes = finalized()
    message = re.escape(f"the directory {tmp_path / 'absent'} does not exist")
    with pytest.raises(FileNotFoundError, match=message):
        save_compressed(model, tmp_path / "absent" / "m.safetensors", palettes)


# -- files that are not (whole) artifacts -----------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated in the tensor data"),
        pytest.param(lambda raw: raw[:20], id="truncated in the header"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: b"name,value\n" * 20, id="a CSV file"),
    ],
)
def test_a_truncated_or_foreign_file_is_named_with_its_size_and_the_likely_cause(
    tmp_path, damage
) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    path.write_bytes(damage(path.read_bytes()))
    size = path.stat().st_size
    for read in (lambda: load_compressed(Net(), path), lambda: read_palettes(path)):
        with pytest.raises(ValueError, match="not a readable safetensors file") as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{path}: ") and f"({size} bytes;" in message
        assert "truncated" in message and "save_compressed()" in message


def test_a_plain_safetensors_state_dict_is_named_as_not_an_artifact(tmp_path) -> None:
    model = Net()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="has no lightning_dkm metadata") as err:
        load_compressed(Net(), path)
    assert str(err.value).startswith(f"{path}: ")
    assert "model.load_state_dict()" in str(err.value)


def drop_metadata(path, key: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del m[key]
    save_file(t, str(path), metadata=m)


@pytest.mark.parametrize("key", ["lightning_dkm.layout", "lightning_dkm.sha256"])
def test_a_missing_metadata_entry_is_named(tmp_path, key) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    drop_metadata(path, key)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=f"metadata entries \\['{key}'\\] are missing") as err:
        load_compressed(fresh, path)
    assert str(err.value).startswith(f"{path}: ")
    assert_same_state(fresh.state_dict(), before)


def test_a_directory_instead_of_the_file_is_named(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a directory")):
        load_compressed(Net(), tmp_path)


def test_a_missing_clustered_tensor_is_named_by_its_key(tmp_path) -> None:
    model, palettes = finalized()
    path = save_compressed(model, tmp_path / "m.safetensors", palettes)
    rewrite(path, tensors=lambda t: t.pop("lut/fc.weight"))
    with pytest.raises(ValueError, match=r"missing \['lut/fc\.weight'\]") as err:
        load_compressed(Net(), path)
    assert str(err.value).startswith(f"{path}: ")


def test_save_compressed_raises_a_full_disk_as_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError; the docs promise OSError."""
    from safetensors import SafetensorError

    import lightning_dkm.export.artifact as artifact_module
    from lightning_dkm import palettize, save_compressed

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    palettize(model, bits=2)
    path = tmp_path / "m.dkm.safetensors"
    save_compressed(model, path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(StorageFull)")

    monkeypatch.setattr(artifact_module, "save_file", full_disk)
    with pytest.raises(OSError, match=str(path)) as info:
        save_compressed(model, path)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, SafetensorError)
    assert path.read_bytes() == before
