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
  process and no Manager is ever started. An async save (BackgroundWrite, below) runs the same
  fan-out in one forked process per rank and sends its results back over a pipe (ResultBox).
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
import gc
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ckpt_manifest import hash_files
from .pinned_staging import bucket_sizes

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
def protected_writers(results: Any | None = None) -> Iterator[None]:
    """Around a dist_checkpointing.save: no Manager process, signal-proof writers.

    results: the object Megatron's writer puts its results into (an in-process queue.Queue for a
    synchronous save; a ResultBox for one written by a BackgroundWrite)."""
    global _saving
    install()
    module = _filesystem_async()
    previous = module._results_queue if module is not None else None
    if module is not None:
        module._results_queue = results if results is not None else queue.Queue()
    _saving = True
    try:
        yield
    finally:
        _saving = False
        if module is not None:
            module._results_queue = previous


# Test hook: seconds the background writer waits before writing, so that tests can stop or kill
# a run while a background write is in flight (a tiny model's write takes milliseconds).
WRITE_DELAY_ENV = "RECIPEC_TEST_CKPT_WRITE_DELAY_S"


class ResultBox:
    """Megatron's write-results queue for a BackgroundWrite: holds the one result `put` there.

    The writer process puts into its own copy; BackgroundWrite sends it over a pipe and puts it
    into the rank's copy, where Megatron's finalize takes it with get_nowait()."""

    def __init__(self) -> None:
        self._items: list[Any] = []

    def put(self, item: Any) -> None:
        self._items.append(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise queue.Empty
        return self._items.pop(0)


@dataclass
class WriteReport:
    """What a rank's background writer did: Megatron's write results (or its exception), the
    hashes of the files it wrote, its seconds writing and hashing, or why it failed."""

    results: Any = None
    files: dict[str, Any] = field(default_factory=dict)
    write_s: float = 0.0
    hash_s: float = 0.0
    error: str | None = None


def _write_in_background(async_fn: Any, args: list[Any], kwargs: dict[str, Any], send: Any, directory: Path,
                         names: list[str]) -> None:
    """The forked writer: Megatron's write (itself forking one process per file), then hash and
    fsync those files; one WriteReport back down the pipe. GC stays off: the rank's CUDA tensors
    must not be freed from a forked copy (Megatron's writers do the same)."""
    gc.disable()
    report = WriteReport()
    try:
        delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        started = time.perf_counter()
        async_fn(*args, **kwargs)
        report.write_s = time.perf_counter() - started
        report.results = args[2].get_nowait()
        if not isinstance(report.results, BaseException):
            started = time.perf_counter()
            report.files = hash_files(directory, names)
            report.hash_s = time.perf_counter() - started
    except BaseException as exc:  # noqa: BLE001 - reported to the rank, which agrees on it with the others
        report.error = f"{type(exc).__name__}: {exc}"
    try:
        send.send(report)
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable exception in the results
        send.send(WriteReport(error=f"could not report the write: {type(exc).__name__}: {exc}"))
    send.close()


class BackgroundWrite:
    """One rank's share of an async save (Megatron's AsyncRequest), written by a forked process.

    Why our own caller and not Megatron's AsyncCallsQueue: that is deprecated in megatron-core
    0.19 (in favour of NVRx, which is not installed everywhere) and its completion check
    all-reduces a CUDA tensor, so it cannot run on CPU. The request itself (Megatron's
    `save(..., async_sharded_save=True)`) is the same in 0.16 and 0.19.

    Why a fork, as Megatron's TemporalAsyncCaller does, rather than a thread: the writer never
    reads live training state. The staged tensors are copies (pinned_staging.StagingArena's shared
    slices, which the rank writes again only at the next save, after this writer has finished; or
    Megatron's preload), and anything else is frozen by the fork (copy-on-write); the writer
    processes are forked from a single-threaded process. Started inside protected_writers(), the
    writer ignores stop signals and dies with its rank.
    """

    def __init__(self, request: Any, directory: Path, stage: Callable[[list[Any]], list[Any]] | None = None) -> None:
        """stage: copies the write buckets' tensors to host memory in place of Megatron's preload
        (pinned_staging.StagingArena.stage)."""
        self.finalize_fns: list[Any] = list(request.finalize_fns)
        self.report: WriteReport | None = None
        self.process: Any = None
        self.box: ResultBox | None = None
        self.staged_sizes: list[int] = []  # bytes of each tensor staged for the writer (pinned_staging)
        if request.async_fn is None:  # nothing of this rank's to write
            self.report = WriteReport()
            return
        args = list(request.async_fn_args)
        if stage is not None:
            args[1] = stage(args[1])  # the staging (D2H) copy: part of the stall
        elif request.preload_fn is not None:
            args[1] = request.preload_fn()
        self.staged_sizes = bucket_sizes(args[1])
        self.box = args[2]
        names = [bucket[1] for bucket in args[1]]
        context = mp.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_write_in_background, name="recipec-ckpt-writer",
                                       args=(request.async_fn, args, dict(request.async_fn_kwargs), send,
                                             directory, names))
        self.process.start()
        send.close()

    def busy(self) -> bool:
        """Whether the write is still running (never blocks)."""
        if self.report is None:
            self._collect(block=False)
        return self.report is None

    def wait(self) -> WriteReport:
        """Block until the writer has reported (or died); its report."""
        while self.report is None:
            self._collect(block=True)
        if self.process is not None:
            self.process.join()
        return self.report

    def _collect(self, block: bool) -> None:
        ended = False  # the pipe reached its end without a report: the writer died
        try:
            if self._receive.poll(0.05 if block else 0) or not self.process.is_alive():
                if self._receive.poll(0):
                    self.report = self._receive.recv()
                else:
                    ended = not self.process.is_alive()
        except (EOFError, OSError):
            ended = True
        if ended:
            self.process.join()
            self.report = WriteReport(error=f"the checkpoint writer process exited with code {self.process.exitcode} "
                                            "without reporting")
        if self.report is not None:
            self._receive.close()
            if self.box is not None and self.report.results is not None:
                self.box.put(self.report.results)

    def finalize(self) -> None:
        """Megatron's finalize callbacks (collective: write results gathered, .metadata written)."""
        for fn in self.finalize_fns:
            fn()
