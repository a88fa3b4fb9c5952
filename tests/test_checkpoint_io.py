"""Checkpoints stay loadable whatever the file systems.

Lightning's default (``TorchCheckpointIO`` -> ``_atomic_save`` -> fsspec ``LocalFileOpener``)
writes a checkpoint into ``tempfile.mkstemp()`` and moves it with ``shutil.move``; when the
temporary directory is on another file system the move is a copy over the previous checkpoint.
The ``other_file_system`` fixture makes ``tmp_path / "system-tmp"`` the temporary directory and
makes every rename between it and anywhere else fail with ``EXDEV``, as it does between two
mounts. :class:`~lightning_dkm.AtomicCheckpointIO` writes beside the target and renames within
its directory, so it never copies and a crash leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import io
import os
import select
import shutil
import signal
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import TinyNet, distinct_per_palette, trainer

import lightning_dkm
from lightning_dkm import AtomicCheckpointIO, DKMCallback, clustered_tensors
from lightning_dkm.lightning import checkpoint_io

#: What torch.load raises for a truncated zip: "failed finding central directory", or EINVAL
#: when the cut leaves an end record pointing past the end of the file.
UNLOADABLE = (RuntimeError, OSError)
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")


def checkpoint(version: int) -> dict:
    return {"epoch": version, "state_dict": {"w": torch.full((128, 256), float(version))}}


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def other_file_system(tmp_path, monkeypatch) -> Path:
    """The system temporary directory, on "another file system": renames across it fail."""
    temp_root = tmp_path / "system-tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))

    def inside(path) -> bool:
        return Path(os.path.realpath(path)).is_relative_to(temp_root)

    def failing_across(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)

        return move

    for name in ("rename", "replace", "link"):
        monkeypatch.setattr(os, name, failing_across(getattr(os, name)))
    return temp_root


def copy_dies_midway(monkeypatch, die) -> None:
    """``shutil.move``'s cross-device fallback (``copy2`` -> ``copyfile``) writes half of the
    file into an existing target, then ``die()``s: a full disk or a kill."""
    real_copyfile = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if not os.path.exists(dst):
            return real_copyfile(src, dst, *args, **kwargs)
        data = Path(src).read_bytes()
        with open(dst, "wb") as f:  # what copyfile does first
            f.write(data[: len(data) // 2])
        die()

    monkeypatch.setattr(shutil, "copyfile", copyfile)


def no_copy(monkeypatch) -> None:
    def copyfile(src, dst, *args, **kwargs):
        raise AssertionError(f"copied {src} to {dst}")

    monkeypatch.setattr(shutil, "copyfile", copyfile)


def write_dies_midway(monkeypatch, die) -> None:
    """A write over an existing checkpoint gets half of its bytes into the plugin's temporary
    file, then ``die()``s: a full disk or a kill."""
    real_write_beside = checkpoint_io.write_beside

    def write_beside(path, write):
        if not path.exists():
            return real_write_beside(path, write)

        def half_then_die(f):
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()

        return real_write_beside(path, half_then_die)

    monkeypatch.setattr(checkpoint_io, "write_beside", write_beside)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


@pytest.fixture(params=["unnamed", "named"])
def temporary(request, monkeypatch) -> str:
    """Both ways the plugin starts a write: an ``O_TMPFILE`` file, and the hidden named file
    of a file system without ``O_TMPFILE`` (forced here)."""
    if request.param == "named":
        def unsupported(directory):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported", str(directory))

        monkeypatch.setattr(checkpoint_io, "_open_unnamed", unsupported)
    elif not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this platform")
    return request.param


def killed_while(work, stall_patch) -> None:
    """Fork a child that runs ``work()`` with ``stall_patch(stall)`` applied, where ``stall()``
    tells the parent it got there and sleeps; the parent then kills it with SIGKILL."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)

            def stall():
                os.write(write_end, b"x")
                time.sleep(60)

            stall_patch(stall)
            work()
        finally:
            os._exit(3)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        assert ready and os.read(read_end, 1) == b"x", "the writer never reached the stall"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# -- the root: Lightning's default across file systems ------------------------------------------

def test_lightnings_default_copies_across_file_systems_and_a_failing_copy_truncates_the_previous(
    tmp_path, other_file_system, monkeypatch
):
    target = tmp_path / "ckpt" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(checkpoint(1), target)
    copy_dies_midway(monkeypatch, disk_full)
    with pytest.raises(OSError, match="injected"):
        TorchCheckpointIO().save_checkpoint(checkpoint(2), target)
    assert 0 < target.stat().st_size < len(torch_bytes(checkpoint(2)))
    with pytest.raises(UNLOADABLE):
        load(target)  # the previous good checkpoint is gone


@needs_fork
def test_a_kill_during_lightnings_cross_device_copy_truncates_last_ckpt_and_orphans_the_temp_file(
    tmp_path, other_file_system, monkeypatch
):
    target = tmp_path / "ckpt" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(checkpoint(1), target)
    killed_while(lambda: TorchCheckpointIO().save_checkpoint(checkpoint(2), target),
                 lambda stall: copy_dies_midway(monkeypatch, stall))
    with pytest.raises(UNLOADABLE):
        load(target)
    (orphan,) = other_file_system.iterdir()
    assert load(orphan)["epoch"] == 2  # the whole new checkpoint, left in the temp directory


# -- the plugin ------------------------------------------------------------------------------------

def test_across_file_systems_the_plugin_replaces_the_checkpoint_without_copying(
    tmp_path, other_file_system, monkeypatch, temporary
):
    no_copy(monkeypatch)
    target = tmp_path / "ckpt" / "last.ckpt"  # the directory is created, as Lightning's does
    for version in (1, 2):
        AtomicCheckpointIO().save_checkpoint(checkpoint(version), target)
    assert load(target)["epoch"] == 2
    assert files_in(target.parent) == ["last.ckpt"]
    assert files_in(other_file_system) == []


def test_a_write_failing_midway_keeps_the_previous_checkpoint_and_no_temporary_file(
    tmp_path, other_file_system, monkeypatch, temporary
):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), target)
    before = target.read_bytes()
    write_dies_midway(monkeypatch, disk_full)
    with pytest.raises(OSError, match="injected"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2), target)
    assert target.read_bytes() == before
    assert load(target)["epoch"] == 1
    assert files_in(tmp_path) == ["last.ckpt", "system-tmp"]
    assert files_in(other_file_system) == []


def test_a_failing_fsync_keeps_the_previous_checkpoint_and_no_temporary_file(
    tmp_path, monkeypatch, temporary
):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), target)

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="injected"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2), target)
    assert load(target)["epoch"] == 1
    assert files_in(tmp_path) == ["last.ckpt"]


@needs_fork
@pytest.mark.parametrize("point", ["midway", "before_the_rename"])
def test_a_kill_9_during_the_write_keeps_the_previous_checkpoint_loadable(
    tmp_path, other_file_system, monkeypatch, temporary, point
):
    """SIGKILL, so nothing can clean up: an unnamed file vanishes with the process; a named one
    (no ``O_TMPFILE``) can stay as one hidden ``.last.ckpt.<random>.tmp``. Never truncated."""
    target = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), target)

    def stall_at(stall):
        if point == "midway":
            write_dies_midway(monkeypatch, stall)
        else:
            monkeypatch.setattr(os, "fsync", lambda fd: stall())

    killed_while(lambda: AtomicCheckpointIO().save_checkpoint(checkpoint(2), target), stall_at)
    assert load(target)["epoch"] == 1
    left = [name for name in files_in(target.parent) if name != "last.ckpt"]
    if temporary == "unnamed":
        assert left == []
    else:
        assert len(left) == 1 and left[0].startswith(".last.ckpt.") and left[0].endswith(".tmp")
    assert files_in(other_file_system) == []


def test_the_checkpoint_is_on_disk_before_it_replaces_the_previous_one(
    tmp_path, monkeypatch, temporary
):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), target)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync directory" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    AtomicCheckpointIO().save_checkpoint(checkpoint(2), target)
    assert events == ["fsync file", "replace", "fsync directory"]
    assert load(target)["epoch"] == 2


def test_a_replaced_checkpoint_keeps_its_mode_and_a_new_one_gets_the_usual_mode(
    tmp_path, temporary
):
    umask = os.umask(0o022)
    try:
        new, replaced = tmp_path / "new.ckpt", tmp_path / "replaced.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), new)
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), replaced)
        replaced.chmod(0o600)
        AtomicCheckpointIO().save_checkpoint(checkpoint(2), replaced)
    finally:
        os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o644
    assert replaced.stat().st_mode & 0o777 == 0o600


def test_a_directory_in_place_of_the_checkpoint_is_named(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"last\.ckpt: it is a directory"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), tmp_path / "last.ckpt")
    assert files_in(tmp_path) == ["last.ckpt"]


def test_a_file_url_is_written_beside_its_target(tmp_path, other_file_system, monkeypatch):
    no_copy(monkeypatch)
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), f"file://{target}")
    assert load(target)["epoch"] == 1


def test_remote_paths_and_storage_options_are_lightnings_default(monkeypatch):
    written = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint",
                        lambda self, ckpt, path, storage_options=None: written.append(path))
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), "memory://run/last.ckpt")
    assert written == ["memory://run/last.ckpt"]
    monkeypatch.undo()
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), "/nowhere/last.ckpt", {"a": 1})


def test_loading_and_removing_are_lightnings(tmp_path):
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint(checkpoint(1), tmp_path / "a.ckpt")
    assert plugin.load_checkpoint(tmp_path / "a.ckpt")["epoch"] == 1
    (tmp_path / "sharded.ckpt").mkdir()
    (tmp_path / "sharded.ckpt" / "shard0").write_bytes(b"x")
    for name in ("a.ckpt", "sharded.ckpt", "missing.ckpt"):
        plugin.remove_checkpoint(tmp_path / name)
    assert files_in(tmp_path) == []


# -- a fit that crashes while saving last.ckpt, across file systems ------------------------------

def fit_dying_at_the_second_save_of_last_ckpt(tmp_path, plugins) -> Path:
    """DKM from epoch 0; the save of epoch 1's last.ckpt (the second, over epoch 0's) fails
    midway (disk full)."""
    ckpt_dir = tmp_path / "ckpt"
    t = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, plugins=plugins,
                callbacks=[DKMCallback(bits=2), ModelCheckpoint(ckpt_dir, save_last=True)])
    with pytest.raises(OSError, match="injected"):
        t.fit(TinyNet())
    return ckpt_dir


def resume(tmp_path, plugins) -> tuple[TinyNet, ModelCheckpoint]:
    model, checkpoints = TinyNet(), ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, plugins=plugins,
                callbacks=[DKMCallback(bits=2), checkpoints])
    t.fit(model, ckpt_path="last")
    return model, t


def test_with_lightnings_default_a_crash_saving_last_ckpt_across_file_systems_cannot_resume(
    tmp_path, other_file_system, monkeypatch
):
    copy_dies_midway(monkeypatch, disk_full)
    fit_dying_at_the_second_save_of_last_ckpt(tmp_path, plugins=None)
    with pytest.raises(UNLOADABLE):
        resume(tmp_path, plugins=None)


def test_with_the_plugin_a_crash_saving_last_ckpt_across_file_systems_resumes_to_the_end(
    tmp_path, other_file_system, monkeypatch
):
    """A crash midway through a checkpoint write cannot be caused from outside: the plugin's
    ``write_beside`` is wrapped to write half the file and die (``write_dies_midway``)."""
    no_copy(monkeypatch)
    real_write_beside = checkpoint_io.write_beside
    write_dies_midway(monkeypatch, disk_full)
    ckpt_dir = fit_dying_at_the_second_save_of_last_ckpt(tmp_path, [AtomicCheckpointIO()])
    monkeypatch.setattr(checkpoint_io, "write_beside", real_write_beside)  # the disk has room
    assert files_in(ckpt_dir) == ["epoch=1-step=8.ckpt", "last.ckpt"]  # no temporary file
    assert load(ckpt_dir / "last.ckpt")["epoch"] == 0
    model, t = resume(tmp_path, [AtomicCheckpointIO()])
    assert t.current_epoch == 3
    assert load(ckpt_dir / "last.ckpt")["epoch"] == 2
    assert not clustered_tensors(model)  # finalized
    for layer in (model.body[0], model.body[2]):
        assert distinct_per_palette(layer.weight) <= 4
    assert files_in(other_file_system) == []


def test_a_lightningcli_yaml_installs_the_plugin_by_class_path(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          logger: false
          default_root_dir: {tmp_path}
          plugins:
            - class_path: lightning_dkm.AtomicCheckpointIO
          callbacks:
            - class_path: lightning_dkm.DKMCallback
        """))
    cli = LightningCLI(TinyNet, args=["--config", str(config)], run=False,
                       save_config_callback=None)
    assert type(cli.trainer.strategy.checkpoint_io) is lightning_dkm.AtomicCheckpointIO


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
