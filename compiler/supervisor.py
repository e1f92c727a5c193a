"""The process between a stop signal and torchrun: every stop ends in a save, every exit code means one thing.

    python -m recipec.compiler.supervisor -- torchrun ARGS...

`recipec launch`, launch.sh and job.sbatch's task all run torchrun through here, because
torchrun's agent answers SIGTERM by killing the ranks' process groups (their checkpoint
writer processes included) and SIGKILLing them 30 s later: a stop that reaches the agent
loses the save in progress. So torchrun runs in its own session with SIGUSR1 ignored, and
the first SIGINT/SIGTERM/SIGHUP/SIGUSR1 that reaches this process goes straight to the
ranks (torchrun's children): SIGUSR1 as SIGUSR1, the others as SIGTERM. The ranks finish
their step, save, and exit 0; torchrun then exits 0 and so does this process, so a
scheduler's requeue logic sees a clean stop. A second signal stops torchrun at once
(SIGTERM to its process group; a third SIGKILLs it) and the exit code is 128 + the first
signal.

Exit codes: torchrun's own, except that a rank's clean user-error exit (2: the runtime
printed `recipec: error: ...`) is returned as 2, and torchrun's ChildFailedError report,
which says nothing the rank's message did not, is left out. Any other failure report is
passed through unchanged.

Standard library only: this runs inside container images and before torch is imported.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO

Echo = Callable[..., None]
USER_ERROR = 2
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

# torchrun's failure report starts with the agent stopping the other ranks, its "failed" log
# line, or the traceback of ChildFailedError; everything after that belongs to the report.
_REPORT_START = re.compile(
    rb"^(?:[EWI]\d{4} .*\] (?:failed \(exitcode: -?\d+\)|Sending process \d+ closing signal)"
    rb"|Traceback \(most recent call last\):)"
)
_RANK_LINE = re.compile(rb"^\[[A-Za-z][\w-]*?\d+\]:")  # --tee's prefix: [default0]:
_ROOT_EXIT = re.compile(rb"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def _stderr_echo(message: str, err: bool = True) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's rank processes), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


class ReportFilter(threading.Thread):
    """Copies torchrun's stderr line by line, holding back its failure report until the end.

    The ranks' own lines (prefixed `[defaultN]:` by --tee) always pass at once, and so do
    torchrun's until its failure report starts; from then on its lines are kept, and
    `finish()` decides whether they are shown (anything but a rank's user error) or dropped.
    """

    def __init__(self, source: IO[bytes], sink: IO[bytes]) -> None:
        super().__init__(daemon=True, name="recipec-stderr")
        self.source, self.sink = source, sink
        self.held: list[bytes] = []

    def run(self) -> None:
        for line in iter(self.source.readline, b""):
            if _RANK_LINE.match(line):  # a rank's own words always pass
                self._write(line)
            elif self.held or _REPORT_START.match(line):
                self.held.append(line)
            else:
                self._write(line)

    def _write(self, data: bytes) -> None:
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            pass

    def root_cause_exit(self) -> int | None:
        """The first failed rank's exit code from torchrun's report, if it printed one."""
        text = b"".join(self.held)
        if b"ChildFailedError" not in text:
            return None
        match = _ROOT_EXIT.search(text)
        return int(match.group(1)) if match else None

    def finish(self, code: int) -> int:
        """Wait for the end of torchrun's stderr; return the exit code to report."""
        self.join(timeout=10)
        if code != 0 and self.root_cause_exit() == USER_ERROR:
            return USER_ERROR  # the rank printed `recipec: error: ...`; the report adds nothing
        self._write(b"".join(self.held))
        return code


def run_torchrun(argv: Sequence[str], env: dict[str, str] | None = None, echo: Echo = _stderr_echo) -> int:
    """Run torchrun (see the module doc); return the exit code this process should exit with."""
    received: list[int] = []
    started: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # signals that came while torchrun was being started

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if started:
            _stop(started[0], received, echo)
        else:
            early.append(signum)

    # Handlers first, so that no stop signal finds this process without one.
    handlers = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        # USR1 ignored across exec: the torchrun agent must not die of it; the ranks set their own handler.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            proc = subprocess.Popen(list(argv), env=env, start_new_session=True, stderr=subprocess.PIPE)
        finally:
            signal.signal(signal.SIGUSR1, forward)
        started.append(proc)
        if early:
            _stop(proc, received, echo)
        assert proc.stderr is not None
        report = ReportFilter(proc.stderr, sys.stderr.buffer)
        report.start()
        code = proc.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if code < 0:  # torchrun itself died of a signal
        code = 128 - code
    code = report.finish(code)
    if not received:
        return code
    if len(received) > 1:
        return 128 + received[0]
    if code == 0:
        echo(f"recipec: stopped on {signal.Signals(received[0]).name} after the ranks saved; "
             "run the same command again to resume from the checkpoint", err=True)
    return code


def _stop(proc: subprocess.Popen[bytes], received: list[int], echo: Echo) -> None:
    """The first signal goes to the ranks (save and stop); any later one, or one before the ranks
    exist, to torchrun's process group (SIGTERM, from the third on SIGKILL)."""
    signum = received[-1]
    name = signal.Signals(signum).name
    ranks = children(proc.pid) if len(received) == 1 else []
    try:
        if ranks:
            to_ranks = signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM
            echo(f"recipec: {name}: asking {len(ranks)} rank(s) to save a checkpoint and stop "
                 "(send it again to stop at once)", err=True)
            for pid in ranks:
                try:
                    os.kill(pid, to_ranks)
                except ProcessLookupError:
                    pass
        else:
            sig = signal.SIGKILL if len(received) > 2 else signal.SIGTERM
            echo(f"recipec: {name}: stopping torchrun ({signal.Signals(sig).name})", err=True)
            os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def main(args: Sequence[str]) -> int:
    argv = list(args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m recipec.compiler.supervisor -- torchrun ARGS...", file=sys.stderr)
        return USER_ERROR
    try:
        return run_torchrun(argv)
    except FileNotFoundError as exc:
        print(f"recipec: error: cannot start {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
