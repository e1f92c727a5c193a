"""The runtime's one exit-2 boundary: what a user or a file caused becomes one message, exit 2.

Inputs are validated where they are read (plan.json, data files, safetensors, SFT lines) and
raise `RecipeError`s that name the file, the line or key, and a fix. This module is the last
resort around the runtime's entry points (`python -m recipec.runtime.train`, `recipec
convert`): it turns a `RecipeError`, and the few exception types only the outside world can
cause (a file system error with a file-ish errno, bytes that are not UTF-8), into
`recipec: error: ...` on stderr and exit code 2. Everything else is a bug and keeps its
traceback: catching all exceptions would hide bugs behind a message that blames the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable

from recipec.compiler.errors import RecipeError

USER_ERROR = 2

# errnos that mean "this path / this disk", not "this program": the user can act on them.
_FILE_ERRNOS = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error",
}

# Variables torchrun (and `recipec launch`) give every rank; env:// rendezvous needs them all.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class NotLaunchedError(RecipeError):
    """The per-rank entry was started by hand instead of by torchrun."""


def missing_launcher_env(environ: dict[str, str] | None = None) -> list[str]:
    """The torchrun variables this process lacks (empty when torchrun or `recipec launch` started it)."""
    env = os.environ if environ is None else environ
    return [name for name in LAUNCHER_ENV if not env.get(name)]


def not_launched(missing: list[str], artifact: str) -> NotLaunchedError:
    return NotLaunchedError(
        f"this process was not started by torchrun (no {', '.join(missing)} in the environment); "
        f"`python -m recipec.runtime.train` is one rank of a job. Run the whole job with "
        "`recipec launch RECIPE` (or the build directory's launch.sh), or under torchrun: "
        f"`torchrun --nproc-per-node=N -m recipec.runtime.train --artifact {artifact}`")


def user_message(exc: BaseException) -> str | None:
    """The message for a failure a user or a file caused, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, RecipeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _FILE_ERRNOS:
        where = exc.filename if exc.filename is not None else "(a file)"
        extra = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        what = _FILE_ERRNOS[exc.errno]
        hint = ("free space on that file system, or point the run at another one" if exc.errno in
                (errno.ENOSPC, errno.EDQUOT) else "check the path in the recipe and its permissions")
        return f"{what} at {where}{extra} ({os.strerror(exc.errno)})\n   hint: {hint}"
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file the run reads is not UTF-8 text ({exc.reason} at byte {exc.start})\n"
                "   hint: the data files in data.paths and the tokenizer files must be UTF-8")
    return None


def guarded(body: Callable[[], int]) -> int:
    """body(), with user-caused failures turned into `recipec: error: ...` on stderr and exit 2."""
    try:
        return body()
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        print(f"recipec: error: {message}", file=sys.stderr, flush=True)
        return USER_ERROR


def release_distributed() -> None:
    """Tear down the process group after a failure, so the exit is a clean exit 2: left alive,
    gloo's threads can abort the interpreter at exit ("terminate called without an active
    exception", rc 134)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):  # best effort, on a path that is already failing
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
