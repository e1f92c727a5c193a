"""Telling a full disk from other write failures, for checkpoint saves (ckpt_save).

A full disk shows up in many shapes: ENOSPC or EDQUOT anywhere in an exception's chain (torch DCP
wraps each rank's failure in a CheckpointException's `failures`), only the message text, or not at
all (a quota statvfs cannot see, caught by a probe write). Each shape ends in one message, "disk
full at <path>", and exit 2.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """exc, its causes and contexts, and the per-rank failures a torch DCP CheckpointException carries."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, *(a for a in e.args if isinstance(a, BaseException))]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                stack += [x for x in (value if isinstance(value, tuple) else (value,)) if isinstance(x, BaseException)]


def says_disk_full(exc: BaseException | None) -> bool:
    return any((isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(t in str(e) for t in _FULL_TEXT)
               for e in _chain(exc))


def os_error(exc: BaseException | None) -> OSError | None:
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno), None)


def free_bytes(path: Path) -> int:
    """Bytes this process may still write there (root may use the reserved blocks)."""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def probe_full(directory: Path) -> bool:
    """Whether writing 1 MiB there fails with ENOSPC/EDQUOT (quota is invisible to statvfs)."""
    probe = directory / ".recipec_space_probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.errno in _FULL_ERRNOS
    finally:
        probe.unlink(missing_ok=True)
    return False


def full_message(root: Path, step: int, free: int, need: int | None, removed: Path | None) -> str:
    size = f"; the last checkpoint took {need / 2**20:.1f} MiB" if need else ""
    gone = f"; removed the partial {removed.name}" if removed is not None else ""
    return (f"disk full at {root}: checkpoint step {step} does not fit ({free / 2**20:.1f} MiB free{size}){gone}; "
            f"earlier checkpoints are untouched\n   hint: free space there, lower checkpoint.keep_last, or point "
            "checkpoint.save at a larger file system, then relaunch to resume from the last complete checkpoint")
