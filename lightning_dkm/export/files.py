"""Files that are never seen half-written: the one writer of everything lightning_dkm persists
(the artifact, the compression report, the ddp_spawn handoff): temporary file beside the
target, ``fsync``, ``os.replace``, ``fsync`` of the directory; and packages that are
directories (``.mlpackage``, ``.aimodel``): written beside the target, then moved in."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["replace_directory", "write_atomically"]


def _temporary_beside(path: Path) -> tuple[Path, int]:
    """Create an empty, uniquely named hidden file next to ``path`` (same directory, so the
    final ``os.replace`` is a rename within one file system), and the mode the final file
    should have: that of the file it replaces, or the usual ``0o666 & ~umask`` of a new file
    (some writers, safetensors among them, create their output as ``0o600``)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(path.stat().st_mode)
    return tmp, mode


def _fsync_file(path: Path) -> None:
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable. Not possible on Windows, and some file
    systems refuse it; the files are complete either way, so a failure here is ignored."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the path of the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {path}: the directory {path.parent} does not exist; create it first"
        )


def write_atomically(writers: Mapping[str | os.PathLike[str], Callable[[Path], None]]) -> None:
    """Write files so that none is ever seen half-written.

    ``writers[path](tmp)`` writes the whole content of ``path`` into the temporary file ``tmp``
    (in the same directory). Each temporary file is flushed to disk (``fsync``) and only when
    *all* are written are they moved into place with ``os.replace`` (an atomic rename). So a
    crash or kill leaves every ``path`` either as it was or complete, never truncated; an
    exception while writing leaves every previous file untouched; and no temporary file is
    left behind by an exception (a hard kill can leave one, named ``.<name>.<random>.tmp``).
    A replaced file keeps its mode; a new one gets ``0o666 & ~umask``.

    Raises:
        IsADirectoryError: a path is a directory.
        FileNotFoundError: the directory of a path does not exist.
        Exception: whatever a writer raised (after cleaning up).
    """
    targets = {Path(path): write for path, write in writers.items()}
    for path in targets:
        _check_writable(path)
    temps: dict[Path, Path] = {}
    try:
        for path, write in targets.items():
            temps[path], mode = _temporary_beside(path)
            write(temps[path])
            os.chmod(temps[path], mode)
            _fsync_file(temps[path])
        for path in list(temps):
            os.replace(temps[path], path)
            del temps[path]
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for path in targets}:
        _fsync_directory(directory)


def replace_directory(path: Path, write: Callable[[Path], None]) -> None:
    """Write the directory ``path`` (a package) with ``write(staging_path)`` into a hidden
    staging directory beside it, then replace ``path`` by it: an exception in ``write`` leaves
    the previous package untouched and no staging directory behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(staging / path.name)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_directory(path.parent)
