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

Output a person reads: torchrun's start-up banner ("Setting OMP_NUM_THREADS environment variable
...", between rows of stars) is dropped, and so is a rank's `recipec: error:` message (with its
indented hint lines) that another rank has already printed word for word: every rank checks the
same recipe and data, so a user error arrives once per rank. Every other line passes. With
`RECIPEC_VERBOSE=1` in the environment (`recipec launch --verbose`, or `RECIPEC_VERBOSE=1
./launch.sh`) nothing is dropped here, and the ranks, which inherit the variable, keep every
library warning too (runtime/logs.py).

The rendezvous (see rendezvous.py) is checked here too, because this is the one process
every node runs before torchrun, whoever started it: on node 0 of a multi-node run the
rendezvous port must be free before torchrun starts; a rendezvous that fails in torch, or in
which no rank has started after `watchdog_s` (a store that accepts but never answers makes
torchrun wait forever), ends with exit 2 and a message naming launch.master_addr /
launch.master_port instead of torch's traceback or a silent hang.

Standard library only: this runs inside container images and before torch is imported.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import IO

from . import rendezvous
from .rendezvous import Rendezvous

Echo = Callable[..., None]
USER_ERROR = 2
# Set (to anything but "0") for every line of every process: `recipec launch --verbose`.
VERBOSE_ENV = "RECIPEC_VERBOSE"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
POLL_S = 0.5  # how often the rendezvous watchdog looks for the first rank
KILL_GRACE_S = 15  # after SIGTERM to a torchrun stuck in its rendezvous, before SIGKILL

# torchrun's failure report starts with the agent stopping the other ranks, its "failed" log
# line, or the traceback of ChildFailedError; everything after that belongs to the report.
_REPORT_START = re.compile(
    rb"^(?:[EWI]\d{4} .*\] (?:failed \(exitcode: -?\d+\)|Sending process \d+ closing signal)"
    rb"|Traceback \(most recent call last\):)"
)
_RANK_LINE = re.compile(rb"^\[[A-Za-z][\w-]*?\d+\]:")  # --tee's prefix: [default0]:
_ROOT_EXIT = re.compile(rb"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)
# torchrun's banners: a blank line, a row of stars, the text, a row of stars (each line may carry
# the glog prefix `W0101 12:00:00.000 123 torch/distributed/run.py:876] `).
_GLOG = rb"^(?:[EWI]\d{4} [^\]]*\] ?)?"
_BLANK = re.compile(_GLOG + rb"\s*$")
_STARS = re.compile(_GLOG + rb"\*{10,}\s*$")
# The banners nobody needs: recipec's plan sets OMP_NUM_THREADS itself (compiler/plan.py).
NOISE_BANNERS = (b"Setting OMP_NUM_THREADS environment variable",)
_BANNER_MAX_LINES = 8  # a "banner" longer than this is not one: its lines pass


def is_verbose(environ: Mapping[str, str]) -> bool:
    """Whether `environ` asks for every line (VERBOSE_ENV set, and not to "0")."""
    return environ.get(VERBOSE_ENV, "") not in ("", "0")


def _stderr_echo(message: str, err: bool = True) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def _user_error(echo: Echo, problem: tuple[str, str]) -> int:
    """Print a user error as the CLI does (`recipec: error:` and a hint); the exit code for it."""
    message, fix = problem
    echo(f"recipec: error: {message}\n   hint: {fix}", err=True)
    return USER_ERROR


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


class BannerFilter:
    """Drops torchrun's noise banners (NOISE_BANNERS) from its own lines; all else passes, in order.

    A banner is recognised only whole: a row of stars, at most a few lines, a row of stars (and
    the blank line before it). Lines are held while a banner may be starting and given back
    unchanged as soon as it is not one of the noise banners, so nothing else is ever lost.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off (--verbose): every line passes at once
        self.held: list[bytes] = []
        self.inside = False  # the opening row of stars has been seen

    def feed(self, line: bytes) -> list[bytes]:
        """The lines to write now (possibly none, possibly held ones)."""
        if not self.enabled:
            return [line]
        if self.inside:
            self.held.append(line)
            if _STARS.match(line):
                block, self.held, self.inside = self.held, [], False
                return [] if any(text in b"".join(block) for text in NOISE_BANNERS) else block
            return self.flush() if len(self.held) > _BANNER_MAX_LINES else []
        if _STARS.match(line):
            self.held.append(line)
            self.inside = True
            return []
        out = self.flush()
        if _BLANK.match(line):
            self.held = [line]
            return out
        return [*out, line]

    def flush(self) -> list[bytes]:
        """Everything held, given back (the end of the stream, or not a banner after all)."""
        out, self.held, self.inside = self.held, [], False
        return out


class RepeatedErrors:
    """Drops a rank's `recipec: error:` message, and its indented lines, when another rank has
    printed the same message already (see the module doc). Anything else a rank says passes."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.headline: dict[bytes, bytes | None] = {}  # rank prefix -> the error message it is printing
        self.said: dict[tuple[bytes, bytes], bytes] = {}  # (message, line) -> the rank that printed it

    def keep(self, line: bytes) -> bool:
        match = _RANK_LINE.match(line)
        if not self.enabled or match is None:
            return True
        rank, body = match.group(0), line[match.end():]
        if body.startswith(b"recipec: error:"):
            self.headline[rank] = body
        elif not body.startswith((b" ", b"\t")):
            self.headline[rank] = None
        headline = self.headline.get(rank)
        if headline is None:
            return True
        first = self.said.setdefault((headline, body), rank)
        return first == rank


class ReportFilter(threading.Thread):
    """Copies torchrun's stderr line by line, holding back its failure report until the end.

    The ranks' own lines (prefixed `[defaultN]:` by --tee) pass at once (a user error once, not
    once per rank, unless `verbose`), and so do torchrun's until its failure report starts (less
    its noise banners, unless `verbose`); from then on its lines are kept, and `finish()`
    decides whether they are shown (anything but a rank's user error) or dropped.
    """

    def __init__(self, source: IO[bytes], sink: IO[bytes], *, verbose: bool = False) -> None:
        super().__init__(daemon=True, name="recipec-stderr")
        self.source, self.sink = source, sink
        self.held: list[bytes] = []
        self.banners = BannerFilter(enabled=not verbose)
        self.repeats = RepeatedErrors(enabled=not verbose)

    def run(self) -> None:
        for line in iter(self.source.readline, b""):
            if _RANK_LINE.match(line):  # a rank's own words pass (once, for a user error)
                if self.repeats.keep(line):
                    self._write(line)
            elif self.held or _REPORT_START.match(line):
                self._write(b"".join(self.banners.flush()))
                self.held.append(line)
            else:
                self._write(b"".join(self.banners.feed(line)))
        self._write(b"".join(self.banners.flush()))

    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            pass

    def text(self) -> bytes:
        """torchrun's own output held back so far (its failure report)."""
        return b"".join(self.held)

    def root_cause_exit(self) -> int | None:
        """The first failed rank's exit code from torchrun's report, if it printed one."""
        text = self.text()
        if b"ChildFailedError" not in text:
            return None
        match = _ROOT_EXIT.search(text)
        return int(match.group(1)) if match else None

    def finish(self, code: int, *, show: bool = True) -> int:
        """Wait for the end of torchrun's stderr; return the exit code to report. `show=False`
        drops torchrun's report (the caller explains the failure itself)."""
        self.join(timeout=10)
        if code != 0 and self.root_cause_exit() == USER_ERROR:
            return USER_ERROR  # the rank printed `recipec: error: ...`; the report adds nothing
        if show:
            self._write(b"".join(self.held))
        return code


def run_torchrun(argv: Sequence[str], env: dict[str, str] | None = None, echo: Echo = _stderr_echo) -> int:
    """Run torchrun (see the module doc); return the exit code this process should exit with."""
    rdzv = rendezvous.of_argv(argv)
    taken = rendezvous.head_port_problem(rdzv) if rdzv else None
    if taken:
        return _user_error(echo, taken)
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
        report = ReportFilter(proc.stderr, sys.stderr.buffer, verbose=is_verbose(os.environ if env is None else env))
        report.start()
        code, waited, ranks_ran = _wait(proc, rdzv, received)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if code < 0:  # torchrun itself died of a signal
        code = 128 - code
    report.join(timeout=10)  # all of torchrun's output read before it is judged
    failed_to_meet = code != 0 and not ranks_ran and rendezvous.failed_in_torch(report.text())
    if rdzv is not None and not received and (waited or failed_to_meet):
        report.finish(code, show=False)
        return _user_error(echo, rendezvous.failure_message(rdzv, waited_s=waited, torch_output=report.text()))
    code = report.finish(code)
    if not received:
        return code
    if len(received) > 1:
        return 128 + received[0]
    if code == 0:
        echo(f"recipec: stopped on {signal.Signals(received[0]).name} after the ranks saved; "
             "run the same command again to resume from the checkpoint", err=True)
    return code


def _wait(proc: subprocess.Popen[bytes], rdzv: Rendezvous | None,
          received: list[int]) -> tuple[int, int | None, bool]:
    """(torchrun's exit code, the seconds waited when no rank had started within the rendezvous
    bound and torchrun was stopped for it, whether ranks were seen running)."""
    if rdzv is None:
        return proc.wait(), None, False
    deadline = time.monotonic() + rdzv.watchdog_s
    while True:
        try:
            return proc.wait(timeout=POLL_S), None, False
        except subprocess.TimeoutExpired:
            pass
        if received:  # a stop signal takes over
            return proc.wait(), None, False
        if children(proc.pid):  # the rendezvous completed and the ranks run: no bound from here
            return proc.wait(), None, True
        if time.monotonic() >= deadline:
            _kill_group(proc)
            return proc.wait(), rdzv.watchdog_s, False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM torchrun's process group, SIGKILL it if it is still there KILL_GRACE_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


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
