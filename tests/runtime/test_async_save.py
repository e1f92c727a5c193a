"""Asynchronous checkpoint saves (checkpoint.async_save), end to end through `recipec launch` on CPU.

A background write must never become `latest` before it is complete: kill -9 of the whole
process group while a write is in flight resumes from the previous checkpoint; SIGTERM while a
write is in flight completes it and exits 0; resumed losses equal the uninterrupted run's; and
a save spread over two data-parallel ranks (each writes its share) resumes under one. Saves and
loads are fully parallel over the data-parallel ranks: a DP=2 resume reads a share on each rank
(ckpt_state.load_strategy), and a checkpoint whose load fails under it falls back, never hangs.

The tiny model's write takes milliseconds, so the kill and the stop use the writer's test hook
(ckpt_workers.WRITE_DELAY_ENV) to keep a write in flight for a few seconds. All runs share one
schedule (lr_decay_iters=10), so steps of different runs compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, recipec_cmd
from recipec.runtime.ckpt_manifest import verify
from recipec.runtime.ckpt_workers import WRITE_DELAY_ENV

pytestmark = [pytest.mark.timeout(600)]

TOL = 1e-5
COMMON = ("checkpoint.async_save=true", "scheduler.lr_decay_iters=10", "logging.log_interval=1",
          "train.eval_interval=1000", "checkpoint.save_interval=5", "checkpoint.keep_last=3",
          "optimizer.use_distributed_optimizer=true")
SAVING = re.compile(r"saving checkpoint step (\d+) in the background to \S+: training paused (\d+) ms")
SAVED = re.compile(r"saved checkpoint \S+iter_(\d+) \([\d.]+ \w+, written in the background at [\d.]+ \w+/s")
RESERVED = re.compile(r"saving checkpoint step 5 .*; staged into .*, covering (\d+) of \1 staged tensors, 0 unused")
PARALLEL_LOAD = re.compile(r"parallel load over 2 data-parallel ranks: each read its share of [\d.]+ \w+ of tensors "
                           r"\((\d+)%, (\d+)%\)")


class Run:
    """`recipec launch llama3_tiny` with async saves into `<root>/<name>/{out,ckpt,build}`."""

    def __init__(self, root: Path, name: str, nproc: int, *overrides: str) -> None:
        self.dir = root / name
        self.out, self.ckpt = self.dir / "out", self.dir / "ckpt"
        self.argv = recipec_cmd("launch", "llama3_tiny", f"launch.gpus_per_node={nproc}", *COMMON,
                                f"launch.output_dir={self.out}", f"checkpoint.save={self.ckpt}", *overrides,
                                "-o", str(self.dir / "build"))
        self.dir.mkdir(parents=True, exist_ok=True)

    def env(self, delay_s: float = 0) -> dict[str, str]:
        env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
        env.pop(WRITE_DELAY_ENV, None)
        return {**env, WRITE_DELAY_ENV: str(delay_s)} if delay_s else env

    def run(self, rc: int = 0, timeout: float = 300) -> str:
        """Run to the end; the output. On a timeout every process of the run is killed (no orphans)."""
        proc = self.start(delay_s=0)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_9_everything(proc)
            pytest.fail(f"{self.dir.name}: still running after {timeout} s\n" + self.log()[-6000:])
        if code != rc:
            pytest.fail(f"{self.dir.name}: exited {code}, expected {rc}\n" + self.log()[-6000:])
        return self.log()

    def start(self, delay_s: float) -> subprocess.Popen[str]:
        """In its own session (so the test can kill the whole group); output to log.txt."""
        log = open(self.dir / "log.txt", "w")  # noqa: SIM115 - lives as long as the run
        return subprocess.Popen(self.argv, cwd=self.dir, env=self.env(delay_s), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def log(self) -> str:
        return (self.dir / "log.txt").read_text()

    def losses(self) -> dict[int, float]:
        """step -> loss of the latest run that reached it."""
        import json

        path = self.out / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    def latest(self) -> int | None:
        marker = self.ckpt / "latest"
        return int(marker.read_text()) if marker.exists() else None

    def step_dir(self, step: int) -> Path:
        return self.ckpt / f"iter_{step:07d}"


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill_9_everything(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to every process group of the run (launcher, torchrun's agent, ranks, writers), as a
    node failure would: `recipec launch` starts torchrun in a session of its own."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for group in {os.getpgid(p.pid) for p in family if p.is_running()}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after kill -9: {alive}"


def _assert_close(got: dict[int, float], want: dict[int, float], steps: range, what: str) -> None:
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) <= TOL, f"{what}: |diff| per step {diffs}"


def _assert_read_in_parallel(output: str) -> None:
    """Both DP ranks read part of the checkpoint's tensors, neither all of them."""
    shares = PARALLEL_LOAD.search(output)
    assert shares, output[-4000:]
    assert all(0 < int(share) < 100 for share in shares.groups()), shares.group(0)


def _complete(run: Run, step: int) -> None:
    assert verify(run.step_dir(step)) is None, f"iter_{step} does not verify"
    assert not list(run.ckpt.glob(".tmp_iter_*")), "a partial checkpoint directory was left behind"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("async_save")


@pytest.fixture(scope="module")
def reference(root: Path) -> Run:
    """DP=2 (distributed optimizer), 15 uninterrupted steps, async saves at 5, 10 and 15."""
    run = Run(root, "reference", 2, "train.train_iters=15")
    output = run.run()
    assert [int(m.group(1)) for m in SAVING.finditer(output)] == [5, 10, 15], output[-4000:]
    assert [int(m.group(1)) for m in SAVED.finditer(output)] == [5, 10, 15], output[-4000:]
    assert run.latest() == 15
    # Each DP rank planned its own share of the first save's staging memory ahead, exactly as Megatron
    # then distributed the save (runtime/pinned_staging.py; a mismatch on any rank warns).
    assert RESERVED.search(output) and "did not match the save" not in output, output[-4000:]
    for step in (5, 10, 15):
        _complete(run, step)
    return run


def test_async_saves_are_fully_parallel_over_data_parallel_ranks(reference: Run) -> None:
    # Each DP rank writes half: the replicated model weights are split between them too (without
    # the fully parallel strategy DP rank 0 writes all weights and half the optimizer: ~62%).
    shares = [sum(p.stat().st_size for p in reference.step_dir(15).glob(f"__{r}_*.distcp")) for r in (0, 1)]
    assert 0.45 <= shares[0] / sum(shares) <= 0.55, shares


def test_kill_9_during_a_background_write_resumes_from_the_previous_checkpoint(root: Path, reference: Run) -> None:
    run = Run(root, "killed", 2, "train.train_iters=15")
    proc = run.start(delay_s=4)
    partial = run.ckpt / ".tmp_iter_0000010"
    # Step 5's write completed (the save of step 10 waited for it); step 10's is in flight.
    _wait(lambda: run.latest() == 5 and partial.is_dir(), proc, "the background write of step 10")
    _kill_9_everything(proc)
    assert run.latest() == 5 and not run.step_dir(10).exists() and partial.is_dir()
    assert verify(run.step_dir(5)) is None

    output = run.run()
    assert re.search(r"resumed from \S+iter_0000005 at step 5\b", output), output[-4000:]
    assert "iter_0000010 is unusable" not in output  # the partial write was never a candidate
    _assert_read_in_parallel(output)
    _assert_close(run.losses(), reference.losses(), range(6, 16), "resumed at 5 after kill -9 mid-write")
    for step in (5, 10, 15):
        _complete(run, step)
    assert run.latest() == 15


def test_sigterm_during_a_background_write_completes_it_and_exits_0(root: Path, reference: Run) -> None:
    run = Run(root, "stopped", 2, "train.train_iters=15")
    proc = run.start(delay_s=3)
    _wait(lambda: (run.ckpt / ".tmp_iter_0000005").is_dir(), proc, "the background write of step 5")
    assert not run.step_dir(5).exists()
    proc.send_signal(signal.SIGTERM)  # to `recipec launch`, which asks the ranks to save and stop
    try:
        assert proc.wait(timeout=120) == 0, run.log()[-4000:]
    finally:
        if proc.poll() is None:
            _kill_9_everything(proc)
    output = run.log()
    stopped = re.search(r"stopping at step (\d+) on signal", output)
    assert stopped, output[-4000:]
    at = int(stopped.group(1))
    assert 5 < at < 15
    saved = [int(m.group(1)) for m in SAVED.finditer(output)]
    assert saved == [5, at], output[-4000:]  # the write in flight, then the stop's own save
    assert run.latest() == at
    for step in (5, at):
        _complete(run, step)
    assert "Traceback" not in output, output[-4000:]
    _assert_close(run.losses(), reference.losses(), range(1, at + 1), "stopped run vs uninterrupted")


def test_checkpoint_saved_under_dp2_resumes_under_dp1(root: Path, reference: Run) -> None:
    run = Run(root, "dp1", 1, "train.train_iters=15")
    shutil.copytree(reference.ckpt, run.ckpt)
    shutil.rmtree(run.step_dir(15))
    output = run.run()
    assert re.search(r"resumed from \S+iter_0000010 at step 10\b", output), output[-4000:]
    assert "parallel load" not in output  # one rank reads it all
    _assert_close(run.losses(), reference.losses(), range(11, 16), "DP=2 checkpoint resumed under DP=1")
    _complete(run, 15)


def test_a_load_failing_under_parallel_load_falls_back_without_hanging(root: Path, reference: Run) -> None:
    # iter_15 with a damaged zip header the manifest agrees with: only the load notices, on the
    # rank its plan gives that file's tensors (torch DCP makes the failure every rank's).
    run = Run(root, "damaged", 2, "train.train_iters=15")
    shutil.copytree(reference.ckpt, run.ckpt)
    victim = run.step_dir(15) / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[:64] = bytes(b ^ 0xFF for b in data[:64])
    victim.write_bytes(bytes(data))
    path = run.step_dir(15) / "recipec_manifest.json"
    meta = json.loads(path.read_text())
    meta["files"][victim.name]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    path.write_text(json.dumps(meta))

    output = run.run(timeout=240)
    assert "iter_0000015 is unusable" in output and "CheckpointException" in output, output[-4000:]
    assert re.search(r"resumed from \S+iter_0000010 at step 10\b", output), output[-4000:]
    _assert_read_in_parallel(output)
    _assert_close(run.losses(), reference.losses(), range(11, 16), "DP=2 resume after a failed parallel load")
    assert (run.ckpt / "iter_0000015.bad").is_dir()
    _complete(run, 15)
