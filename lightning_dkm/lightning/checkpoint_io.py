"""A checkpoint I/O plugin that never leaves a truncated checkpoint: :class:`AtomicCheckpointIO`.

How Lightning 2.6 writes a checkpoint (``TorchCheckpointIO.save_checkpoint`` ->
``lightning.fabric.utilities.cloud_io._atomic_save``): ``torch.save`` into an in-memory buffer,
then, inside an fsspec ``fs.transaction``, ``fs.open(path, "wb")``. For a local path fsspec's
``LocalFileOpener`` writes the buffer into ``tempfile.mkstemp()``, a file in the *system*
temporary directory, not beside the target, and at the end of the transaction ``commit`` moves it
with ``shutil.move(temp, path)``. When the temporary directory and the checkpoint directory are
on different file systems, ``os.rename`` fails with ``EXDEV`` and ``shutil.move`` falls back to
``copy2``: it opens the target for writing (truncating the previous good checkpoint) and copies
into it, then deletes the temporary file. Nothing is ``fsync``-ed. A kill during that copy leaves
``last.ckpt`` truncated, the previous copy gone and the whole temporary file orphaned in the
temporary directory; an exception during it (a full disk) leaves the target truncated too.

:class:`AtomicCheckpointIO` writes beside the target instead (its docstring), so the last step
is a rename within one directory. The temporary file is an unnamed one (``O_TMPFILE``, Linux),
given a hidden name (``.<name>.<random>.tmp``) only when complete: a kill at any point leaves the
previous checkpoint as it was, and an unnamed file leaves nothing behind (the kernel frees it);
only a kill in the microseconds between naming the finished file and the rename can leave the
hidden file. On a file system without ``O_TMPFILE`` (NFS, some FUSE mounts, non-Linux) it starts
from the hidden named file: an exception still removes it, a hard kill during the write can
leave it (never the target truncated).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from ..export.files import fsync_directory, hidden_beside

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`~lightning.fabric.plugins.TorchCheckpointIO` with a local write that
    a crash cannot truncate, whatever file system the temporary directory is on.

    Use it as a Trainer plugin: ``Trainer(plugins=[AtomicCheckpointIO()])``, or in a
    LightningCLI YAML, ``trainer: plugins: [{class_path: lightning_dkm.AtomicCheckpointIO}]``.

    A local path (or a ``file://`` URL) is written into a temporary file *in the target's
    directory*, flushed to disk (``fsync``) and moved over the target with ``os.replace``, an
    atomic rename; the directory is ``fsync``-ed after it. The previous checkpoint stays whole
    until the new one is complete; an exception while writing (a full disk) leaves no temporary
    file; the data is written once, streamed, without Lightning's in-memory copy of the whole
    checkpoint. A replaced checkpoint keeps its file mode, a new one gets ``0o666 & ~umask``.

    Remote paths (any other fsspec URL: ``s3://``, ``gs://``, ``hdfs://``, ...) are written by
    Lightning's default, unchanged: object stores replace an object whole, and this plugin's
    guarantee is about local file systems only. ``storage_options`` are not supported (a
    ``TypeError``, as with Lightning's default). Loading and removing checkpoints are
    Lightning's, unchanged.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` so that ``path`` is always the previous checkpoint
        or the new one, complete and on disk, never a part of one.

        Raises:
            IsADirectoryError: ``path`` is a directory (a sharded checkpoint).
            TypeError: ``storage_options`` were given.
            OSError: the directory cannot be created or the write fails (after cleaning up).
        """
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_beside(Path(local_path), lambda f: torch.save(checkpoint, f))


def write_beside(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:class:`AtomicCheckpointIO`'s local write (how: its docstring), ``write(file)`` filling
    the file; ``path``'s directory is created if missing. An exception leaves ``path`` as it
    was and no temporary file."""
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write the checkpoint {path}: it is a directory (a sharded checkpoint?); "
            "pass the path of a file"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, named = _open_temporary(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
        with contextlib.suppress(FileNotFoundError):
            if os.name != "nt":
                os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))  # keep a replaced file's mode
        os.fsync(fd)
        if named is None:
            named = hidden_beside(path, "tmp")
            _link_unnamed(fd, named)
        os.replace(named, path)
        named = None
    finally:
        os.close(fd)
        if named is not None:
            named.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _open_temporary(path: Path) -> tuple[int, Path | None]:
    """A new file for writing in ``path``'s directory: ``(fd, None)`` for an unnamed one, which
    vanishes with the process if it dies before the file is named; else ``(fd, hidden_path)``.
    Both are created ``0o666 & ~umask``."""
    try:
        return _open_unnamed(path.parent), None
    except OSError:
        pass  # no O_TMPFILE here (EOPNOTSUPP, EISDIR on old kernels, ...): a named file
    named = hidden_beside(path, "tmp")
    return os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), named


def _link_unnamed(fd: int, named: Path) -> None:
    """Give the unnamed file ``fd`` the name ``named``: ``linkat`` of ``/proc/self/fd/<fd>``
    with ``AT_SYMLINK_FOLLOW`` (needs no privilege, unlike ``AT_EMPTY_PATH``). A directory fd
    makes CPython call ``linkat`` with that flag; plain ``link`` would link the /proc symlink
    itself (``EXDEV``)."""
    dir_fd = os.open(named.parent, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", named.name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _open_unnamed(directory: Path) -> int:
    """``open(directory, O_TMPFILE)``: an unnamed regular file on ``directory``'s file system;
    ``OSError`` where that or naming it through ``/proc/self/fd`` is not possible."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.EOPNOTSUPP, "O_TMPFILE is not available", str(directory))
    return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)

