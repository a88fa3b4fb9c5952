"""Files that are never seen half-written: the one writer of everything lightning_dkm persists
(the artifact, the compression report, the ddp_spawn handoff): temporary file beside the
target, ``fsync``, ``os.replace``, ``fsync`` of the directory; and packages that are
directories (``.mlpackage``, ``.aimodel``): written beside the target, then moved in. Files that
belong together (the report and the artifact it describes) are staged and moved in as one
:class:`FileGroup`."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

__all__ = [
    "FileGroup", "describe_path", "fsync_directory", "hidden_beside", "package_bytes",
    "remove_output", "replace_directory", "safetensors_errors_as_os_errors", "write_atomically",
]


def describe_path(path: str | os.PathLike[str]) -> str:
    """What is at ``path``, for messages: ``"a file"``, ``"a directory"``, ``"a FIFO (named
    pipe)"``, ``"a socket"``, ``"a character device"``, ``"a block device"``, ``"a broken
    symbolic link"``, ``"nothing (it does not exist)"``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.lexists(path) else "nothing (it does not exist)"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    kinds = [(stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def hidden_beside(path: Path, suffix: str) -> Path:
    """A new hidden name next to ``path``: ``.<name>.<random>.<suffix>``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.{suffix}")


def _temporary_beside(path: Path) -> tuple[Path, int]:
    """Create an empty, uniquely named hidden file next to ``path`` (same directory, so the
    final ``os.replace`` is a rename within one file system), and the mode the final file
    should have: that of the file it replaces, or the usual ``0o666 & ~umask`` of a new file
    (some writers, safetensors among them, create their output as ``0o600``)."""
    tmp = hidden_beside(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(path.stat().st_mode)
    return tmp, mode


def fsync_directory(directory: Path) -> None:
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
    exception while writing, or while moving them into place, leaves every previous file as it
    was (:class:`FileGroup`); and no temporary file is left behind by an exception (a hard kill
    can leave one, named ``.<name>.<random>.tmp``). A replaced file keeps its mode; a new one
    gets ``0o666 & ~umask``.

    Raises:
        IsADirectoryError: a path is a directory.
        FileNotFoundError: the directory of a path does not exist.
        Exception: whatever a writer raised (after cleaning up).
    """
    with FileGroup() as group:
        for path, write in writers.items():
            group.stage(path, write)  # checks the path first
        group.commit()


class FileGroup:
    """Files written together and moved into place together: what :func:`write_atomically`
    does, in steps, for a caller that must read one staged file before writing the next (the
    compression report records the digest of the artifact it describes).

    ``stage(path, write)`` writes ``path``'s content into a temporary file beside it (flushed,
    with the final mode) and returns that file; ``commit()`` moves every staged file into place
    in the order staged. An exception in ``commit`` puts back every file it had already
    replaced (each previous file is kept as a hard link, ``.<name>.<random>.previous``, until
    the commit ends; on a file system without hard links that file cannot be put back), so the
    group is replaced whole or not at all; leaving the ``with`` block without ``commit`` (an
    exception) removes the staged files and touches nothing. A hard kill between two renames
    can leave some files new and some old: a reader that must know pairs them by content (the
    report's ``artifact.sha256``).
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}

    def __enter__(self) -> FileGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def stage(self, path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
        """Write ``path``'s content with ``write(tmp)`` into a temporary file beside it and
        return that file (complete and flushed); ``path`` itself is untouched until
        :meth:`commit`."""
        path = Path(path)
        _check_writable(path)
        if path in self._staged:
            raise ValueError(f"{path} is already staged in this group")
        tmp, mode = _temporary_beside(path)
        self._staged[path] = tmp
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        return tmp

    def commit(self) -> None:
        """Move every staged file into place (``os.replace``, in the order staged), all or
        none; then make the renames durable."""
        backups: dict[Path, Path] = {}
        new: set[Path] = set()  # nothing there before: removed again on a failure
        replaced: list[Path] = []
        try:
            for path in self._staged:
                backup = _keep_previous(path)
                if backup is not None:
                    backups[path] = backup
                elif not os.path.lexists(path):
                    new.add(path)
            for path, tmp in self._staged.items():
                os.replace(tmp, path)
                replaced.append(path)
        except BaseException:
            for path in reversed(replaced):  # put the previous files back
                with contextlib.suppress(OSError):
                    if path in backups:
                        os.replace(backups.pop(path), path)
                    elif path in new:
                        path.unlink()
            raise
        finally:
            for backup in backups.values():
                backup.unlink(missing_ok=True)
            directories = {path.parent for path in self._staged}
            self._staged = {path: tmp for path, tmp in self._staged.items()
                            if path not in replaced}
        for directory in directories:
            fsync_directory(directory)

    def discard(self) -> None:
        """Remove the staged files that were not committed."""
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged = {}


def _keep_previous(path: Path) -> Path | None:
    """A hard link to the file ``path`` replaces (``None`` when there is none, or when the file
    system has no hard links: that file then cannot be put back)."""
    if not path.is_file():
        return None
    backup = hidden_beside(path, "previous")
    try:
        os.link(path, backup, follow_symlinks=False)
    except (OSError, NotImplementedError):
        return None
    return backup


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
    fsync_directory(path.parent)


def remove_output(path: Path) -> None:
    """Remove the file or package directory ``path``, never seen half-removed: it is renamed to
    a hidden name beside it first (one atomic rename; an ``OSError`` there leaves it as it was),
    then deleted; a package whose deletion fails midway is left under that hidden name, no
    longer at ``path``."""
    aside = hidden_beside(path, "removed")
    os.rename(path, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    fsync_directory(path.parent)


def package_bytes(path: str | os.PathLike[str]) -> int:
    """The size of a saved package (``.mlpackage``, ``.aimodel``): the bytes of every file in
    it."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def safetensors_errors_as_os_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the block, safetensors' own error (``SafetensorError``: a full disk or an I/O
    error inside its writer) is raised as the ``OSError`` the docs promise, naming ``path``
    (``ENOSPC`` for a full disk); the original stays as ``__cause__``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        full = "StorageFull" in str(err) or "No space" in str(err)
        message = f"writing {path} failed: {err}"
        raise (OSError(errno.ENOSPC, message) if full else OSError(message)) from err
