"""One run owns its run directory: an flock on `<dir>/.lock`, held by rank 0 for the whole run.

Why: two runs started on one output directory both "succeeded" while each replaced the other's
`iter_N` and their metrics.jsonl interleaved. The second run must stop before it writes anything,
and say which run holds the directory.

- `fcntl.flock` (not a PID file): the kernel drops the lock when the holder dies, however it dies
  (kill -9, OOM, node reboot of a local disk), so a stale `.lock` never blocks. The PID, host and
  start time written into the file are information for the message only, never the lock itself.
- Processes forked by rank 0 (checkpoint writers, data workers) would inherit the open file and
  keep the lock alive after rank 0 died; they close their copy right after the fork.
- Rank 0 decides and broadcasts the outcome, so every rank of a refused run stops with the same
  RecipeError (exit 2) instead of waiting for rank 0 in a collective.
- A file system without flock support (some Lustre mounts) gets a warning, not a refusal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from recipec.compiler.errors import RecipeError

log = logging.getLogger("recipec.runtime")
LOCK_NAME = ".lock"
_CHILD_CLOSES: set[int] = set()  # lock fds that forked children must not keep open
_FORK_HOOK = False


class RunDirectoryBusyError(RecipeError):
    """Another live run holds the lock on this run directory."""


def _close_in_child() -> None:
    for fd in list(_CHILD_CLOSES):
        try:
            os.close(fd)
        except OSError:
            pass
    _CHILD_CLOSES.clear()


class RunLock:
    """Exclusive, non-blocking flocks on `.lock` in each directory; `release()` (or exit) frees them."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, directories: Iterable[Path]) -> None:
        global _FORK_HOOK
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_close_in_child)
            _FORK_HOOK = True
        try:
            for directory in _distinct(directories):
                self._lock_one(directory)
        except BaseException:
            self.release()
            raise

    def _lock_one(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusyError(
                    f"{directory} is in use by another run ({holder or 'holder unknown'}; lock file {path}). "
                    "Two runs on one directory overwrite each other's checkpoints and logs.\n"
                    "   hint: wait for that run to end or stop it, or give this run its own launch.output_dir "
                    "and checkpoint.save") from None
            log.warning(f"could not lock {path} ({os.strerror(exc.errno or 0)}: this file system has no flock); "
                        "continuing without protection against a second run on this directory")
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}: {' '.join(sys.argv)[:500]}\n".encode(), 0)
        self._fds.append(fd)
        _CHILD_CLOSES.add(fd)

    def release(self) -> None:
        for fd in self._fds:
            _CHILD_CLOSES.discard(fd)
            try:
                os.close(fd)  # closing the only descriptor drops the flock; the file stays as information
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        self.release()


def _distinct(directories: Iterable[Path]) -> list[Path]:
    seen: dict[str, Path] = {}
    for d in directories:
        seen.setdefault(os.path.realpath(d), Path(d))
    return [seen[k] for k in sorted(seen)]


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 2000, 0).decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def lock_run_directories(directories: Iterable[Path | str | None]) -> RunLock | None:
    """Rank 0 locks every directory (collective; all ranks raise the same error if one is busy).

    Returns rank 0's lock (keep it for the whole run) and None on the other ranks.
    """
    import torch.distributed as dist

    dirs = [Path(d) for d in directories if d]
    lock: RunLock | None = None
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        lock = RunLock()
        try:
            lock.acquire(dirs)
        except RunDirectoryBusyError as exc:
            outcome[0] = str(exc)
        except OSError as exc:  # cannot even create the directory: the same message on every rank
            outcome[0] = f"cannot use run directory {exc.filename}: {os.strerror(exc.errno or 0)}"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if lock is not None:
            lock.release()
        raise RunDirectoryBusyError(outcome[0])
    return lock
