"""A fit owns its ``save_dir`` from ``setup`` to ``teardown``: the lock file.

Two fits writing into one directory would replace each other's report and artifact, and with an
unlucky interleaving leave a report beside another run's artifact. So rank 0 of each fit takes
``save_dir/.lightning_dkm.lock`` at ``setup`` (before training) and removes it at ``teardown`` or
on an exception; a second fit on the same directory is refused at its own ``setup``, naming the
directory and the holder (pid, host, start time, command). Refusing, rather than writing the
second run's outputs beside the first's, keeps the outputs at the fixed names that
``load_compressed``, ``inspect`` and the docs read, and a run never has to guess which of
several reports belongs to it; the directory is free again as soon as the holder ends, so runs
one after another replace the outputs as before.

A lock outlives its run only when the process dies without its teardown (``kill -9``, a lost
node, a ``ddp_spawn`` worker that crashed). On the same host such a lock is recognised (its pid
is not running, or is running a process started at another time) and taken over with a warning;
a lock from another host cannot be checked from here, and the refusal says to delete it if that
run is gone.

The lock is created complete (written to a temporary file, then hard-linked to its name, which
fails if the name exists), so a kill never leaves an empty lock. Under DDP only rank 0 takes it,
and every rank raises rank 0's refusal (a broadcast, so no rank waits for one that stopped).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..export.files import hidden_beside

__all__ = ["LOCK_NAME", "SaveDirLock", "claim_save_dir", "rank_zero_check", "save_dir_label"]

T = TypeVar("T")

#: The lock file a fit keeps in its ``save_dir`` while it runs.
LOCK_NAME = ".lightning_dkm.lock"

# The tokens of the locks this process holds: a refusal by one of them says so.
_HELD: set[str] = set()


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``), to tell a
    reused pid from the process that wrote a lock; ``None`` where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_running(pid: int, started: int | None) -> bool:
    """Whether the process that wrote a lock on this host still runs."""
    if os.name == "nt":  # no signal 0 on Windows: assume it runs (the refusal says what to do)
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # it runs, as another user
    except (ProcessLookupError, OverflowError):  # no such process; no such pid at all
        return False
    now = _process_start(pid)
    return started is None or now is None or now == started


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid_start": _process_start(os.getpid()),
        "command": " ".join(sys.argv)[:300],
        "token": secrets.token_hex(16),
    }


def _describe(holder: dict[str, Any]) -> str:
    command = f", command {holder['command']!r}" if holder.get("command") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('started')}{command}")


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder; ``None`` when it is gone. Raises ``ValueError`` when unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot be read ({err})") from err
    try:
        holder = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"is not a lightning_dkm lock ({err})") from err
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        raise ValueError("is not a lightning_dkm lock (no pid)")
    return holder


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Create the lock ``path`` holding ``holder``, complete or not at all; ``False`` if it
    exists. Written beside it, then hard-linked (``link`` fails on an existing name); where the
    file system has no hard links, ``O_EXCL`` creation and a write."""
    text = json.dumps(holder, indent=2) + "\n"
    tmp = hidden_beside(path, "tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class SaveDirLock:
    """Rank 0's hold on ``save_dir`` (:func:`claim_save_dir`); :meth:`release` ends it. Holds
    primitives only, so a callback that holds one still pickles."""

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token

    def release(self) -> None:
        """Remove the lock, if it is still this one's (never another run's)."""
        _HELD.discard(self.token)
        with contextlib.suppress(OSError, ValueError):
            holder = _read(self.path)
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink()


def _take(directory: Path, label: str) -> SaveDirLock:
    """Take ``directory``'s lock or raise ``MisconfigurationException`` naming its holder."""
    path = directory / LOCK_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MisconfigurationException(
            f"DKMCallback: {label}: the lock file {path} exists and is not a regular file; "
            "remove it"
        )
    holder = _holder()
    for _ in range(3):  # a lock can vanish between a failed create and the read: try again
        try:
            if _create(path, holder):
                _HELD.add(holder["token"])
                return SaveDirLock(path, holder["token"])
        except OSError as err:
            raise MisconfigurationException(
                f"DKMCallback: {label} is not writable: creating the lock file {path} failed "
                f"({err.strerror or err}); pass a writable directory as save_dir"
            ) from err
        try:
            other = _read(path)
        except ValueError as err:
            raise MisconfigurationException(
                f"DKMCallback: {label} may be in use by another run: its lock file {path} {err}. "
                "If no other fit writes into this directory, delete the lock file"
            ) from err
        if other is None:
            continue
        same_host = other.get("host") == holder["host"]
        if same_host and not _is_running(other["pid"], other.get("pid_start")):
            rank_zero_warn(
                f"DKMCallback: {label} was locked by {_describe(other)}, which is no longer "
                f"running (it ended without releasing {path}); taking it over"
            )
            _remove_if_unchanged(path, other)
            continue
        if other.get("token") in _HELD:
            raise MisconfigurationException(
                f"DKMCallback: {label} is in use by another DKMCallback in this process "
                f"({_describe(other)}; lock file {path}): a fit still running, or another "
                "callback of this Trainer. Their reports and artifacts would replace each "
                "other's; give each DKMCallback its own save_dir"
            )
        where = ("" if same_host else
                 f" (another host: whether it still runs cannot be checked from "
                 f"{holder['host']!r})")
        raise MisconfigurationException(
            f"DKMCallback: {label} is in use by another fit: {_describe(other)}{where}, which "
            f"holds the lock file {path}. Two fits writing into one directory would replace "
            "each other's report and artifact; wait for it to end, pass another save_dir, or, "
            "if that run is gone, delete the lock file"
        )
    raise MisconfigurationException(
        f"DKMCallback: {label}: could not take the lock file {path} (other runs keep taking "
        "it); pass another save_dir"
    )


def _remove_if_unchanged(path: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock ``path`` unless another run has replaced it meanwhile: it is
    renamed aside first (one rename wins), then checked."""
    aside = hidden_beside(path, "stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if _read(aside) != stale:  # a live run's fresh lock: put it back
            with contextlib.suppress(OSError):
                os.link(aside, path)
    except ValueError:
        pass
    finally:
        aside.unlink(missing_ok=True)


def rank_zero_check(trainer: pl.Trainer, check: Callable[[], T]) -> T | None:
    """Run ``check`` on rank 0 only and make every rank raise its
    ``MisconfigurationException`` (a broadcast, so no rank waits at a later collective for a
    rank that stopped); ``check``'s result on rank 0, ``None`` on the others. Call it on every
    rank."""
    result, refusal = None, None
    if trainer.global_rank == 0:
        try:
            result = check()
        except MisconfigurationException as err:
            refusal = str(err)
    refusal = trainer.strategy.broadcast(refusal, src=0)
    if refusal is not None:
        raise MisconfigurationException(refusal)
    return result


def save_dir_label(directory: Path, explicit: bool) -> str:
    """How messages name the output directory: as ``save_dir`` when the user gave it
    (``explicit``), else as the default."""
    if explicit:
        return f"save_dir={str(directory)!r}"
    return f"the default output directory {directory}"


def claim_save_dir(trainer: pl.Trainer, directory: Path, explicit: bool = True
                   ) -> SaveDirLock | None:
    """At ``setup``, on every rank: rank 0 takes ``directory``'s lock; every rank raises rank
    0's refusal (a ``MisconfigurationException`` naming the directory, as
    :func:`save_dir_label` does, and the holder). Returns the lock on rank 0, ``None`` on the
    others."""
    label = save_dir_label(directory, explicit)
    return rank_zero_check(trainer, lambda: _take(directory, label))
