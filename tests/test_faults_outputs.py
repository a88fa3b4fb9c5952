"""Faults around what a fit writes into ``save_dir`` (issue #23, items 1, 4 and 6): a run owns its
``save_dir`` for its lifetime (a second run is refused at setup, naming the holder; a lock left
by a dead process is taken over), the report records the digest of the artifact beside it,
everything knowable before training is checked at setup (path kinds, free space), a failed
write at fit end leaves the previous report and artifact as a pair, and ``save_dir`` is resolved
once, absolute, with ``~`` expanded."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from extras import need
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, trainer
from safetensors import SafetensorError

import lightning_dkm.export.artifact as artifact_module
import lightning_dkm.export.files as files_module
import lightning_dkm.lightning.preflight as preflight_module
from lightning_dkm import DKMCallback
from lightning_dkm.export.files import write_atomically
from lightning_dkm.export.report import CompressionReport
from lightning_dkm.lightning.ownership import LOCK_NAME, claim_save_dir

ARTIFACT = "model.dkm.safetensors"
OUTPUTS = (ARTIFACT, "compression_report.json", "compression_report.md")


class BatchCounter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def fit(root: Path, callback: DKMCallback, *extra: pl.Callback, **kwargs) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    trainer(root, callbacks=[callback, *extra], **kwargs).fit(model)
    return model


def contents(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (hidden ones too) by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def dead_pid() -> int:
    """A pid no process can have: above the kernel's limit."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**31 - 2


def write_lock(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": "2025-01-01T00:00:00+00:00", "token": "someone-else"}
    holder.update(fields)
    path = directory / LOCK_NAME
    path.write_text(json.dumps(holder))
    return path


# -- item 1: a run owns its save_dir ---------------------------------------------------------------
class SecondFit(pl.Callback):
    """While the first fit trains, starts a second fit on the same save_dir and keeps what it
    raised."""

    def __init__(self, root: Path, save_dir: Path) -> None:
        self.root, self.save_dir = root, save_dir
        self.error: BaseException | None = None
        self.counter = BatchCounter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != 0:
            return
        try:
            fit(self.root, DKMCallback(bits=4, save_dir=str(self.save_dir)), self.counter)
        except MisconfigurationException as err:
            self.error = err


def test_a_second_fit_on_a_save_dir_in_use_is_refused_at_setup_naming_its_holder(tmp_path):
    out = tmp_path / "dkm"
    second = SecondFit(tmp_path / "second", out)
    first = DKMCallback(bits=2, save_dir=str(out))
    fit(tmp_path, first, second)
    assert second.error is not None, "the second fit was not refused"
    message = str(second.error)
    for part in (str(out), f"pid {os.getpid()}", socket.gethostname(), "started", LOCK_NAME):
        assert part in message, (part, message)
    assert second.counter.batches == 0  # refused before any training step
    # what is in save_dir is the first run's, and its report describes its artifact
    report = json.loads((out / "compression_report.json").read_text())
    assert {layer["bits"] for layer in report["layers"]} == {2}
    data = (out / ARTIFACT).read_bytes()
    assert report["artifact"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("holder", "says"),
    [
        ({"pid": os.getppid()}, rf"pid {os.getppid()} on host '{socket.gethostname()}'"),
        ({"pid": dead_pid(), "host": "elsewhere.example"},
         rf"pid {dead_pid()} on host 'elsewhere\.example'"),
    ],
    ids=["another_live_process", "another_host"],
)
def test_a_save_dir_locked_by_another_fit_is_refused_naming_the_holder(tmp_path, holder, says):
    out = tmp_path / "dkm"
    write_lock(out, **holder)
    counter = BatchCounter()
    with pytest.raises(MisconfigurationException,
                       match=rf"save_dir=.*dkm.* in use by another fit: {says}, started "
                             rf"2025-01-01T00:00:00\+00:00") as caught:
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)), counter)
    if "host" in holder:  # a pid on another host is not taken for dead
        caught.match("another host: whether it still runs cannot be checked")
    assert counter.batches == 0
    assert not (out / ARTIFACT).exists()
    assert json.loads((out / LOCK_NAME).read_text())["token"] == "someone-else"  # left alone


def test_two_callbacks_of_one_fit_on_one_save_dir_are_refused(tmp_path):
    out = str(tmp_path / "dkm")
    first = DKMCallback(bits=2, targets=["body.0"], save_dir=out)
    second = DKMCallback(bits=3, targets=["body.2"], save_dir=out)
    with pytest.raises(MisconfigurationException,
                       match=r"in use by another DKMCallback in this process.*its own save_dir"):
        fit(tmp_path, first, second)
    assert not (tmp_path / "dkm" / LOCK_NAME).exists()  # the first released it


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "dkm"
    write_lock(out, pid=dead_pid())
    with pytest.warns(UserWarning, match=rf"pid {dead_pid()}.*no longer running.*taking it over"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)))
    assert (out / ARTIFACT).is_file()
    assert not (out / LOCK_NAME).exists()  # released at the end, not left to the next run


class LockWatcher(pl.Callback):
    """Records whether the save_dir lock exists while training runs."""

    def __init__(self, save_dir: Path, crash: bool = False) -> None:
        self.save_dir, self.crash = save_dir, crash
        self.held: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lock = self.save_dir / LOCK_NAME
        self.held = json.loads(lock.read_text()) if lock.is_file() else {}
        if self.crash:
            raise RuntimeError("deliberate crash")


@pytest.mark.parametrize("crash", [False, True], ids=["fit_ends", "fit_crashes"])
def test_the_save_dir_is_locked_during_fit_and_released_after(tmp_path, crash):
    out = tmp_path / "dkm"
    watcher = LockWatcher(out, crash=crash)
    if crash:
        with pytest.raises(RuntimeError, match="deliberate crash"):
            fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)), watcher)
    else:
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)), watcher)
    assert watcher.held is not None
    assert watcher.held.get("pid") == os.getpid()
    assert watcher.held.get("host") == socket.gethostname()
    assert not (out / LOCK_NAME).exists()
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)))  # the next run gets the directory
    assert (out / ARTIFACT).is_file()


def test_only_rank_zero_takes_the_lock_and_every_rank_raises_its_refusal(tmp_path):
    def rank(global_rank: int, from_rank_zero):
        strategy = types.SimpleNamespace(broadcast=lambda obj, src=0: from_rank_zero(obj))
        return types.SimpleNamespace(global_rank=global_rank, strategy=strategy)

    assert claim_save_dir(rank(1, lambda obj: obj), tmp_path) is None
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(MisconfigurationException, match="rank zero says no"):
        claim_save_dir(rank(1, lambda obj: "rank zero says no"), tmp_path)
    lock = claim_save_dir(rank(0, lambda obj: obj), tmp_path)
    assert lock is not None and (tmp_path / LOCK_NAME).is_file()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_report_records_the_size_and_sha256_of_its_artifact(tmp_path):
    out = tmp_path / "dkm"
    cb = DKMCallback(bits=2, save_dir=str(out))
    fit(tmp_path, cb)
    data = (out / ARTIFACT).read_bytes()
    expected = {"file": ARTIFACT, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((out / "compression_report.json").read_text())["artifact"] == expected
    assert CompressionReport.load(out).artifact == expected == cb.report.artifact


def test_a_report_without_an_artifact_records_none(tmp_path):
    out = tmp_path / "dkm"
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(out), save_artifact=False))
    assert json.loads((out / "compression_report.json").read_text())["artifact"] is None
    assert CompressionReport.load(out).artifact is None


# -- a save_dir holds one fit's outputs ----------------------------------------------------------
def exporting_fit(root: Path, out: Path, **kwargs) -> DKMCallback:
    """A fit of TinyNet (with an ``example_input_array``) writing into ``out``."""
    torch.manual_seed(0)
    model = TinyNet()
    model.example_input_array = torch.randn(2, 32)
    callback = DKMCallback(bits=2, save_dir=str(out), verbose=False, **kwargs)
    trainer(root, callbacks=[callback], max_epochs=1).fit(model)
    return callback


@pytest.mark.filterwarnings("ignore")
def test_an_earlier_fits_artifact_and_packages_this_fit_does_not_write_are_removed_saying_so(
    tmp_path, caplog
):
    need("coremltools")
    need("coreai_torch")
    out = tmp_path / "dkm"
    exporting_fit(tmp_path, out, export_coreml=True, export_coreai=True)
    assert {ARTIFACT, "model.mlpackage", "model.aimodel"} <= {p.name for p in out.iterdir()}
    caplog.set_level(logging.INFO)
    callback = exporting_fit(tmp_path, out, save_artifact=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS[1:])  # the report alone
    assert set(callback.output_paths) == {"json", "markdown"}
    for name in (ARTIFACT, "model.mlpackage", "model.aimodel"):
        assert str(out / name) in caplog.text  # named as removed
    assert "an earlier fit's output" in caplog.text


@pytest.mark.filterwarnings("ignore")
def test_an_earlier_fits_package_goes_when_this_fits_export_of_it_fails(tmp_path, monkeypatch):
    need("coreai_torch")
    from lightning_dkm.export import coreai

    out = tmp_path / "dkm"
    exporting_fit(tmp_path, out, export_coreai=True)
    assert (out / "model.aimodel").is_dir()

    def broken(*args, **kwargs):
        raise ValueError("the runtime is away")

    monkeypatch.setattr(coreai, "export_coreai", broken)
    with pytest.raises(RuntimeError, match="failed after training"):
        exporting_fit(tmp_path, out, export_coreai=True)
    assert not (out / "model.aimodel").exists()  # not the earlier fit's, passing for this one's
    assert CompressionReport.load(out).exports == {}
    assert (out / ARTIFACT).is_file()


def test_what_no_earlier_report_records_is_kept_with_a_warning_naming_it(tmp_path):
    """Files at the outputs' names that no earlier fit's report records writing may be the
    user's own: never removed, always named."""
    out = tmp_path / "dkm"
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(out), verbose=False))
    (out / ARTIFACT).write_bytes(b"the user's own bytes")  # no longer the recorded SHA-256
    package = out / "model.mlpackage"
    package.mkdir()
    (package / "mine.txt").write_text("a user's package")
    with pytest.warns(UserWarning) as caught:
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out), verbose=False, save_artifact=False))
    messages = "\n".join(str(w.message) for w in caught)
    for name, why in ((ARTIFACT, "save_artifact=False"),
                      ("model.mlpackage", "export_coreml=False")):
        assert re.search(rf"{out / name} is not this fit's output \({why}\).*left as it is",
                         messages)
    assert (out / ARTIFACT).read_bytes() == b"the user's own bytes"
    assert (package / "mine.txt").read_text() == "a user's package"


# -- item 4: what can be known before training is checked at setup -------------------------------
@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        (ARTIFACT, Path.mkdir, "a directory"),
        ("compression_report.json", os.mkfifo, "a FIFO"),
        ("compression_report.md", Path.mkdir, "a directory"),
    ],
    ids=["artifact_directory", "report_fifo", "markdown_directory"],
)
def test_an_output_path_that_is_not_a_file_fails_at_setup_naming_it(tmp_path, name, make, kind):
    out = tmp_path / "dkm"
    out.mkdir()
    make(out / name)
    counter = BatchCounter()
    with pytest.raises(MisconfigurationException,
                       match=rf"{out / name}.*is {kind}.*not a file"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)), counter)
    assert counter.batches == 0


def test_a_package_path_that_is_a_file_fails_at_setup_naming_it(tmp_path):
    out = tmp_path / "dkm"
    out.mkdir()
    (out / "model.mlpackage").write_text("not a package")
    with pytest.raises(MisconfigurationException,
                       match=r"model\.mlpackage.*is a file.*not a directory"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out), export_coreml=True))


def test_too_little_free_space_fails_at_setup_with_the_estimate(tmp_path, monkeypatch):
    """A full disk cannot be made on demand: the preflight's ``disk_usage`` (its only reading of
    the free space) is replaced by one reporting 1000 bytes free."""
    out = tmp_path / "dkm"
    monkeypatch.setattr(preflight_module, "disk_usage",
                        lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
    counter = BatchCounter()
    fp32 = 4 * sum(p.numel() for p in TinyNet().parameters())
    with pytest.raises(MisconfigurationException,
                       match=rf"save_dir=.*dkm.*1,000 bytes free.*{fp32:,} fp32 bytes"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)), counter)
    assert counter.batches == 0


def _write_half_then_fail(error: BaseException):
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of the file, then the disk is full
        raise error

    return save_file


def test_a_write_failing_at_fit_end_leaves_the_previous_report_and_artifact_as_a_pair(
    tmp_path, monkeypatch
):
    """A write cannot be made to fail halfway on demand: safetensors' ``save_file``, as the artifact
    module calls it, writes half the file and raises."""
    out = tmp_path / "dkm"
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)))
    before = contents(out)
    assert set(OUTPUTS) <= set(before)
    monkeypatch.setattr(artifact_module, "save_file",
                        _write_half_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        fit(tmp_path, DKMCallback(bits=4, save_dir=str(out)))
    assert contents(out) == before  # the same pair, no temporary file, no lock left


def test_a_safetensors_error_from_the_artifact_writer_surfaces_as_an_oserror(
    tmp_path, monkeypatch
):
    """safetensors raises its own SafetensorError on a failed write, which no test disk produces:
    ``save_file``, as the artifact module calls it, raises one after writing half."""
    out = tmp_path / "dkm"
    fit(tmp_path, DKMCallback(bits=2, save_dir=str(out)))
    before = contents(out)
    monkeypatch.setattr(artifact_module, "save_file", _write_half_then_fail(SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
        '"No space left on device" })')))
    with pytest.raises(OSError, match=rf"{ARTIFACT}.*No space left") as caught:
        fit(tmp_path, DKMCallback(bits=4, save_dir=str(out)))
    assert isinstance(caught.value.__cause__, SafetensorError)
    assert contents(out) == before


def test_a_failing_rename_while_committing_a_group_restores_every_previous_file(
    tmp_path, monkeypatch
):
    """A rename cannot be made to fail on demand: ``os.replace``, as ``export/files.py`` calls it,
    fails for one file of the group."""
    first, added, last = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    first.write_bytes(b"old a")
    last.write_bytes(b"old c")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == last:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        write_atomically({first: lambda p: p.write_bytes(b"new a"),
                          added: lambda p: p.write_bytes(b"new b"),
                          last: lambda p: p.write_bytes(b"new c")})
    monkeypatch.undo()
    # a and c as they were, b (new) gone again, no temporary file or backup left
    assert contents(tmp_path) == {"a.bin": b"old a", "c.bin": b"old c"}


# -- item 6: save_dir resolved once ----------------------------------------------------------------
class ChangeDirectory(pl.Callback):
    def __init__(self, monkeypatch, to: Path) -> None:
        self.monkeypatch, self.to = monkeypatch, to

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.monkeypatch.chdir(self.to)


def test_a_relative_save_dir_is_resolved_once_at_setup_whatever_the_working_directory_becomes(
    tmp_path, monkeypatch
):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cb = DKMCallback(bits=2, save_dir="out")
    fit(tmp_path, cb, ChangeDirectory(monkeypatch, tmp_path / "b"))
    assert Path.cwd() == tmp_path / "b"
    assert set(OUTPUTS) <= set(contents(tmp_path / "a" / "out"))
    assert not (tmp_path / "b" / "out").exists()
    assert cb.artifact_path == tmp_path / "a" / "out" / ARTIFACT


def test_a_save_dir_with_a_tilde_is_under_the_home_directory(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cb = DKMCallback(bits=2, save_dir="~/x")
    fit(tmp_path, cb)
    assert set(OUTPUTS) <= set(contents(home / "x"))
    assert not (work / "~").exists()
    assert cb.artifact_path == home / "x" / ARTIFACT


def test_a_save_dir_that_is_a_fifo_is_named_as_one(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(MisconfigurationException,
                       match=r"save_dir=.*pipe.*is a FIFO \(named pipe\), not a directory"):
        fit(tmp_path, DKMCallback(bits=2, save_dir=str(tmp_path / "pipe")))
