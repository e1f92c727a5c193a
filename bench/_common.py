"""What the launch benches share: running `recipec launch` as a user does (a subprocess, timed from
its start), and reading what a run leaves behind (metrics.jsonl, the rank-0 log lines).

The parsers are lenient on purpose: the log wording of saves and of the start-up breakdown belongs
to the runtime and may change; a field that is not found is None, never an exception. Where a
number can be measured from outside (step times, the moment a checkpoint directory appears), the
benches measure it themselves and report the runtime's own figure beside it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def recipec_pythonpath() -> str | None:
    """A directory to put on PYTHONPATH so that `import recipec` works in this process and in the
    torchrun ranks (the GPU machine runs from a plain checkout, no install); None when recipec is
    installed (an editable install of a checkout counts)."""
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "recipec_pkg"
    try:
        import recipec.compiler

        if Path(recipec.compiler.__file__).parents[2] != root:  # installed, not our symlink farm
            return None
        return str(root)
    except ImportError:
        pass
    pkg = root / "recipec"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("compiler", "runtime", "recipes_toml"):
        link = pkg / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return str(root)


def child_env(cpu: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched run: recipec importable, unbuffered output, no GPU for --cpu."""
    env = dict(os.environ)
    root = recipec_pythonpath()
    if root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RECIPEC_VERBOSE", None)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


# Lines torchrun's agent adds after a rank fails: never the reason.
_AGENT_NOISE = re.compile(r"ChildFailedError|To enable traceback|error_file:|elastic/multiprocessing|"
                          r"torch/distributed/run\.py|^\s*raise |Root Cause|FAILED$")
_PREFIXES = re.compile(r"^(?:[\d.]+\s+)?(?:\[[^\]]*\]:\s*)*")  # a bench timestamp, [default0]:[rank0]:
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt): \S")


def failure_reason(log: str) -> str:
    """Why a launch failed, in one line: what recipec said (`recipec: error: ...`, a numbered list of
    problems folded in), else the first exception a rank raised (`[rank0]: ValueError: ...`), else the
    last line that looks like an error, torchrun's own ChildFailedError report skipped."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "recipec: error:" in line:
            head = line.split("recipec: error:", 1)[1].strip()
            items = []
            for follow in lines[i + 1:]:
                if not re.match(r"\d+\. ", follow):
                    break
                items.append(follow.split(" ", 1)[1])
            return "; ".join([head.rstrip(":"), *items]) if items else head
    useful = [line for line in lines if not _AGENT_NOISE.search(line)]
    raised = [bare for bare in (_PREFIXES.sub("", line) for line in useful) if _EXCEPTION.match(bare)]
    if raised:
        return raised[0][:400]
    errors = [line for line in useful if re.search(r"(Error|error)\b", line)]
    return (errors or useful or lines or ["no output"])[-1][:400]


# ---------------------------------------------------------------- running a launch

STEP_LINE = re.compile(r"\bstep\s+(\d+)/(\d+)\s*\|")


@dataclass
class Launch:
    """One `recipec launch` subprocess: its exit code, output lines with the seconds since the
    subprocess started at which each arrived, and its wall time."""

    rc: int
    wall_s: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first_step_s(self) -> float | None:
        """Seconds from the subprocess start to the arrival of the first step's progress line."""
        return next((t for t, line in self.lines if STEP_LINE.search(line)), None)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def launch(recipe: str, overrides: list[str], *, cwd: Path, cpu: bool, timeout_s: float,
           log_path: Path | None = None, on_line: Any = None) -> Launch:
    """`recipec launch RECIPE OVERRIDES...` through this interpreter, as a user runs it; the clock
    starts just before the subprocess does. A run past `timeout_s` is stopped (SIGTERM to its
    session, then SIGKILL) and gets rc 124."""
    argv = [sys.executable, "-m", "recipec.compiler.cli", "launch", recipe, *overrides]
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w") if log_path else None  # noqa: SIM115
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=child_env(cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, bufsize=1)
    out = Launch(rc=-1, wall_s=0.0)
    fired: list[bool] = []
    timer = threading.Timer(timeout_s, lambda: (fired.append(True), _stop_session(proc)))
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            now = time.perf_counter() - started
            out.lines.append((now, line))
            if log:
                log.write(f"{now:9.3f} {line}\n")
                log.flush()
            if on_line:
                on_line(now, line)
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _stop_session(proc)
        if log:
            log.close()
    out.rc = 124 if fired else rc
    out.wall_s = time.perf_counter() - started
    return out


def _stop_session(proc: subprocess.Popen[str]) -> None:
    """Stop a launch as a scheduler would: SIGTERM (recipec's supervisor has the ranks save and
    exit), a second SIGTERM (it stops torchrun at once), then SIGKILL."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- metrics.jsonl

def read_jsonl(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The records of metrics.jsonl from byte `offset` on (a relaunch appends to the same file)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def per_step_times(rows: list[dict[str, Any]]) -> dict[int, float]:
    """step -> seconds, from the one-step log windows (logging.log_interval=1)."""
    return {int(r["step"]): float(r["step_time_s"]) for r in rows
            if r.get("window_steps") == 1 and "step_time_s" in r and "step" in r}


# ---------------------------------------------------------------- start-up breakdown

STARTUP_FIELDS = ("imports_s", "process_group_s", "model_s", "optimizer_s", "data_s", "checkpoint_load_s",
                  "first_step_s", "launch_to_first_step_s")
_STARTUP_LINE = re.compile(r"startup:\s*(?P<body>.*)")
_PART = re.compile(r"(?P<name>[a-z][a-z _/-]*?)\s+(?P<value>\d+(?:\.\d+)?)\s*s\b")


def startup_breakdown(rows: list[dict[str, Any]], text: str) -> dict[str, float] | None:
    """The runtime's start-up breakdown: its metrics.jsonl event {"event": "startup", ...}, else its
    rank-0 log line `startup: imports 2.1 s, ...; launch to first step 8.5 s`; None if neither."""
    for r in rows:
        if r.get("event") == "startup":
            return {k: float(v) for k, v in r.items() if k.endswith("_s") and isinstance(v, (int, float))}
    for line in reversed(text.splitlines()):
        m = _STARTUP_LINE.search(line)
        if not m:
            continue
        parts = {}
        for p in _PART.finditer(m.group("body")):
            key = re.sub(r"[ /-]+", "_", p.group("name").strip()) + "_s"
            parts[key] = float(p.group("value"))
        if parts:
            return parts
    return None


# ---------------------------------------------------------------- checkpoint log lines

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE = r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\b"
_SIZE_RE = re.compile(_SIZE, re.IGNORECASE)
_RATE_RE = re.compile(_SIZE + r"/s", re.IGNORECASE)
_ITER = re.compile(r"iter_(\d+)")
_SECONDS = re.compile(r"\bin\s+(\d+(?:\.\d+)?)\s*s\b")
_MS = re.compile(r"(?:stall(?:ed)?|paused)\D{0,20}?(\d+(?:\.\d+)?)\s*ms\b|(\d+(?:\.\d+)?)\s*ms\s+stall",
                 re.IGNORECASE)


def to_bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit.lower()]


def save_events(text: str) -> list[dict[str, Any]]:
    """Every checkpoint-save line of a run, as far as it can be read: step, size_bytes, the stall
    the runtime reports (stall_s: `... in 0.12 s` or `stall 120 ms`), and every rate it names
    (rates_Bps: `written at 110.2 MiB/s`, a finalize `... MB/s`)."""
    events = []
    for line in text.splitlines():
        low = line.lower()
        if "checkpoint" not in low or not any(w in low for w in ("saved", "save", "saving", "finaliz", "written", "stall", "paused")):
            continue
        if "resumed" in low or "verifying" in low or "error" in low:
            continue
        it = _ITER.search(line) or re.search(r"\bstep (\d+)", line)
        ev: dict[str, Any] = {"line": line.strip(), "step": int(it.group(1)) if it else None,
                              "done": "saved" in low}
        rates = [to_bytes(n, u) for n, u in _RATE_RE.findall(line)]
        sizes = [to_bytes(n, u) for n, u in _SIZE_RE.findall(_RATE_RE.sub("", line))]
        ev["size_bytes"] = sizes[0] if sizes else None
        ev["rates_Bps"] = rates
        ms = _MS.search(line)
        sec = _SECONDS.search(line)
        ev["stall_s"] = (float(ms.group(1) or ms.group(2)) / 1e3) if ms else (float(sec.group(1)) if sec else None)
        events.append(ev)
    return events


_RESUMED = re.compile(r"resumed from (?P<dir>\S+) at step (?P<step>\d+)")
_VERIFIED = re.compile(r"verified .*? in (?P<s>\d+(?:\.\d+)?) s")
_LOADED = re.compile(r"loaded in (?P<s>\d+(?:\.\d+)?) s")


def resume_event(text: str) -> dict[str, Any] | None:
    """The resume line of runtime/checkpoint.py: `resumed from DIR at step N...: verified K files
    (SIZE) in V s, loaded in L s (RATE/s)`."""
    for line in text.splitlines():
        m = _RESUMED.search(line)
        if not m:
            continue
        v, ld = _VERIFIED.search(line), _LOADED.search(line)
        sizes = [to_bytes(n, u) for n, u in _SIZE_RE.findall(_RATE_RE.sub("", line))]
        return {"line": line.strip(), "step": int(m.group("step")), "verify_s": float(v.group("s")) if v else None,
                "load_s": float(ld.group("s")) if ld else None, "size_bytes": sizes[0] if sizes else None}
    return None


# ---------------------------------------------------------------- stall from step times

def save_stalls(times: dict[int, float], save_steps: list[int], interval: int, warmup: int = 3
                ) -> tuple[float | None, list[dict[str, Any]]]:
    """Per save at step s: the step-time excess over the median step time (steps after `warmup`).

    The save runs after step s is logged, so its pause shows in step s+1's time (or in s's, if a
    runtime saves before logging); `first_s` is the larger excess of those two steps. `total_s`
    sums the signed excess of steps s .. s+interval-1 (up to the next save), so work the save
    leaves to later steps (a background write competing for the host, finalizing) counts too,
    while noise cancels. A save without timed steps after it (the last one) is left out."""
    steady = [t for s, t in times.items() if s > warmup]
    if len(steady) < 3:
        return None, []
    median = statistics.median(steady)
    out = []
    for s in save_steps:
        window = [times[j] for j in range(s, s + interval) if j in times]
        if s + 1 not in times:
            continue
        first = max(times.get(s, median), times[s + 1]) - median
        out.append({"step": s, "first_s": first, "total_s": sum(t - median for t in window),
                    "window_steps": len(window)})
    return median, out


# ---------------------------------------------------------------- the file system

def dd_throughput(directory: Path, mib: int, timeout_s: float = 600) -> dict[str, Any]:
    """`dd if=/dev/zero of=DIR/... bs=1M count=MIB conv=fsync`: bytes / seconds as dd reports them
    (the wall clock around it as a fallback); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / ".ckpt_bench_dd_probe"
    cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    finally:
        wall = time.perf_counter() - started
        target.unlink(missing_ok=True)
    m = re.search(r"(\d+) bytes.*copied,\s*([\d.,]+)\s*s", proc.stderr)
    nbytes = int(m.group(1)) if m else mib * 2**20
    seconds = float(m.group(2).replace(",", ".")) if m else wall
    return {"command": " ".join(cmd), "rc": proc.returncode, "bytes": nbytes, "seconds": seconds,
            "Bps": nbytes / seconds if seconds > 0 else None, "stderr": proc.stderr.strip()[-300:]}


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class CheckpointWatcher(threading.Thread):
    """Watches a checkpoint root from outside the run: when each `.tmp_iter_N` (save started) and
    `iter_N` (complete: renamed into place) first appears, seconds since `t0`, and iter_N's size
    when it appeared (keep_last may prune it later)."""

    def __init__(self, root: Path, t0: float, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.t0, self.every_s = root, t0, every_s
        self.started: dict[int, float] = {}
        self.completed: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.scan()
            self._halt.wait(self.every_s)
        self.scan()

    def scan(self) -> None:
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        now = time.perf_counter() - self.t0
        for name in names:
            tmp = name.startswith(".tmp_iter_")
            digits = name[len(".tmp_iter_"):] if tmp else name[5:] if name.startswith("iter_") else ""
            if not digits.isdigit():
                continue
            step = int(digits)
            if tmp:
                self.started.setdefault(step, now)
            elif step not in self.completed:
                self.completed[step] = now
                self.sizes[step] = tree_bytes(self.root / name)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def gbps(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e9:.2f}"
