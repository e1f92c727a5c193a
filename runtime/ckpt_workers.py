"""Megatron-Core's checkpoint writer processes: they survive stop signals and die with their rank.

Read off megatron-core 0.16.1, dist_checkpointing/strategies/filesystem_async.py (0.19 has the
same code): a torch_dist save forks `thread_count` (2) writer processes from the rank
(`write_preloaded_data_multiproc`, fork context) and collects their results through a
module-global queue made by `mp.get_context("spawn").Manager().Queue()`. That Manager is a
server process (a fresh interpreter that re-imports the rank's main module, ~300 MB, plus
multiprocessing's resource tracker) started at the rank's first save and kept for good.

Two faults came from it:

1. SIGTERM to the rank's whole process group (what torchrun's agent sends its ranks when it shuts
   down, and what `scancel` sends every process of a step) also reaches the Manager, which dies
   of it: the rank's next `put` raises BrokenPipeError, the save fails with rc 1, `.tmp_iter_*`
   stays behind and the steps since the last periodic save are lost.
2. kill -9 of a rank leaves the Manager and its resource tracker running for good (orphans).

What `protected_writers()` (around every save) and `install()` do about it:

- The result queue becomes an in-process `queue.Queue`: a synchronous save runs the fan-out
  in the rank itself (AsyncRequest.execute_sync), so both ends of the queue are in this
  process and no Manager is ever started.
- Writers forked during a save get a no-op Python handler for SIGTERM, SIGINT and SIGUSR1: the
  rank's own handler (train.StopSignal) decides when to stop, a writer only finishes its file.
  A Python handler rather than SIG_IGN, so that anything a writer execs gets default handling.
- Every process forked from the rank's main thread gets PR_SET_PDEATHSIG = SIGKILL, so it dies
  with its parent, however the parent died. Linux ties the death signal to the forking
  *thread*, so forks from other threads are left alone (the thread could end before the
  process); subprocess and spawn children run no at-fork hooks and are left alone too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1
_installed = False
_saving = False
_fork_parent = {"pid": 0, "main_thread": False}


def _before_fork() -> None:
    _fork_parent["pid"] = os.getpid()
    _fork_parent["main_thread"] = threading.current_thread() is threading.main_thread()


def _ignore_stop(_signum: int, _frame: Any) -> None:
    """A writer's stop-signal handler: nothing; its rank finishes the save and then stops."""


def _after_fork_in_child() -> None:
    if _saving:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _ignore_stop)
    if _fork_parent["main_thread"] and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != _fork_parent["pid"]:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    """Register the at-fork hooks once per process (inherited by forked children)."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _installed = True


def _filesystem_async() -> Any | None:
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return None
    return filesystem_async if hasattr(filesystem_async, "_results_queue") else None


@contextlib.contextmanager
def protected_writers() -> Iterator[None]:
    """Around a synchronous dist_checkpointing.save: no Manager process, signal-proof writers."""
    global _saving
    install()
    module = _filesystem_async()
    previous = module._results_queue if module is not None else None
    if module is not None:
        module._results_queue = queue.Queue()
    _saving = True
    try:
        yield
    finally:
        _saving = False
        if module is not None:
            module._results_queue = previous
