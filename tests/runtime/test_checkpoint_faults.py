"""Faults against checkpoints, end to end on the tiny recipe through a real torchrun (CPU, gloo).

Each test does to a run what the world does to one (a block flipped in place, a damaged zip
header, a second run on the same directory, SIGTERM to a rank's process group in the middle of
a save, kill -9 in the middle of a save, a disk that fills up during a save) and asserts the
exit code and what was lost: at most the steps since the last completed save, never a
completed checkpoint, never a corrupted one loaded.

All runs share one schedule (lr_decay_iters=10), so steps of different runs compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytest.importorskip("megatron.core")

from recipec.compiler import build
from recipec.runtime.ckpt_manifest import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import free_tcp_port, torchrun_cmd  # noqa: E402

TOL = 1e-5
TP2 = ("train.train_iters=15", "parallel.tensor_model_parallel_size=2")
COMMON = ["scheduler.lr_decay_iters=10", "logging.log_interval=1", "train.eval_interval=1000",
          "checkpoint.save_interval=5", "checkpoint.keep_last=3"]


class Run:
    """A compiled tiny recipe writing to `<root>/<name>/{out,ckpt}` (several builds may share them)."""

    def __init__(self, root: Path, name: str, nproc: int, *overrides: str, ckpt: Path | None = None,
                 build_dir: str = "build") -> None:
        self.dir = root / name
        self.out, self.ckpt, self.nproc = self.dir / "out", ckpt or self.dir / "ckpt", nproc
        self.artifact = build("llama3_tiny", [*COMMON, f"launch.gpus_per_node={nproc}", f"launch.output_dir={self.out}",
                                              f"checkpoint.save={self.ckpt}", *overrides]).write(self.dir / build_dir)

    def command(self) -> list[str]:
        return torchrun_cmd(self.nproc, "-m", "recipec.runtime.train", "--artifact", str(self.artifact))

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", **extra}

    def run(self, rc: int | None = 0, timeout: int = 300) -> str:
        proc = subprocess.run(self.command(), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=False)
        output = proc.stdout + proc.stderr
        if rc is not None and proc.returncode != rc:
            pytest.fail(f"{self.dir.name}: exited {proc.returncode}, expected {rc}\n" + output[-6000:])
        return output

    def start_one_rank(self) -> subprocess.Popen[str]:
        """The rank itself, without torchrun's agent in between (its exit code is the rank's)."""
        env = self.env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_tcp_port()))
        return subprocess.Popen([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(self.artifact)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def start(self) -> subprocess.Popen[str]:
        log = open(self.dir / f"torchrun-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - lives as long as the run
        return subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def losses(self) -> dict[int, float]:
        """step -> loss of the latest run that reached it."""
        path = self.out / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    def latest(self) -> int | None:
        marker = self.ckpt / "latest"
        return int(marker.read_text()) if marker.exists() else None


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 240,
          every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def _rank(agent: subprocess.Popen[str]) -> psutil.Process:
    """The one rank under a torchrun agent."""
    _wait(lambda: bool(psutil.Process(agent.pid).children()), agent, "the rank to start")
    return psutil.Process(agent.pid).children()[0]


def _survivors(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those still running (zombies count as gone: they hold no memory) after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _assert_close(got: dict[int, float], want: dict[int, float], steps: range, what: str) -> None:
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) <= TOL, f"{what}: |diff| per step {diffs}"


def _complete_and_intact(ckpt: Path, step: int) -> None:
    assert verify(ckpt / f"iter_{step:07d}") is None, f"iter_{step} does not verify"
    assert not list(ckpt.glob(".tmp_iter_*")), "a partial checkpoint directory was left behind"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def trained(root: Path) -> Run:
    """Two ranks (TP=2: each writes its own shards), 15 steps, complete checkpoints at 5, 10 and 15."""
    run = Run(root, "trained", 2, *TP2)
    run.run()
    assert sorted(p.name for p in run.ckpt.glob("iter_*")) == ["iter_0000005", "iter_0000010", "iter_0000015"]
    return run


def _flip(path: Path, offset: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
    path.write_bytes(bytes(data))


def _rehash(step_dir: Path, name: str) -> None:
    """Make the manifest agree with damaged bytes, so that only the load itself can notice."""
    path = step_dir / "recipec_manifest.json"
    meta = json.loads(path.read_text())
    if isinstance(meta["files"][name], dict):  # (a manifest of sizes only has nothing to update)
        meta["files"][name]["sha256"] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
        path.write_text(json.dumps(meta))


def test_corrupted_checkpoints_are_marked_bad_and_the_last_good_one_resumes(root: Path, trained: Run) -> None:
    run = Run(root, "corrupted", 2, *TP2)
    shutil.copytree(trained.ckpt, run.ckpt)
    # iter_15: 4 KB flipped in place in rank 1's shard, same size (loaded silently before hashes).
    victim = run.ckpt / "iter_0000015" / "__1_0.distcp"
    size = victim.stat().st_size
    _flip(victim, size // 2, 4096)
    assert victim.stat().st_size == size
    # iter_10: a damaged zip header that the manifest agrees with: torch DCP raises its
    # CheckpointException (a BaseException, which `except Exception` missed) on the load.
    _flip(run.ckpt / "iter_0000010" / "__1_0.distcp", 0, 64)
    _rehash(run.ckpt / "iter_0000010", "__1_0.distcp")

    output = run.run()
    assert "iter_0000015 is unusable: rank 1: file __1_0.distcp has sha256" in output and "corrupted in place" in output
    assert "iter_0000010 is unusable" in output and "CheckpointException" in output
    assert "resumed from" in output and "iter_0000005 at step 5" in output
    # Lost: steps 6-15, retrained to the same losses; the damaged ones are kept aside, out of pruning's count.
    _assert_close(run.losses(), trained.losses(), range(6, 16), "resumed from iter_5 after two bad checkpoints")
    assert (run.ckpt / "iter_0000015.bad" / "RECIPEC_BAD.txt").read_text().startswith("rank 1: file __1_0.distcp")
    assert (run.ckpt / "iter_0000010.bad").is_dir()
    assert run.latest() == 15
    for step in (5, 10, 15):
        _complete_and_intact(run.ckpt, step)


def test_second_run_is_refused_and_sigterm_mid_save_still_completes_the_save(root: Path) -> None:
    owner = Run(root, "owner", 1, "train.train_iters=2000")
    intruder = Run(root, "owner", 2, "train.train_iters=2000", build_dir="build2")
    agent = owner.start()
    rank = _rank(agent)
    try:
        _wait(lambda: len(owner.losses()) >= 1, agent, "the first step")
        output = intruder.run(rc=None)
        # Both ranks of the second run stop with the lock holder's PID and host, exit 2 (torchrun's agent
        # may end the slower one with SIGTERM once the first has exited).
        holder = f"is in use by another run (pid {rank.pid} on host {socket.gethostname()}"
        assert output.count(holder) == 2, output[-4000:]
        assert "exitcode  : 2" in output, output[-4000:]
        assert agent.poll() is None, "the first run must not be disturbed"
        steps = [json.loads(line)["step"] for line in (owner.out / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps), "metrics.jsonl interleaved with another run's"

        # SIGTERM to the rank's whole process group (torchrun's agent on shutdown, scancel) while its
        # checkpoint writer processes are running.
        _wait(lambda: owner.latest() is not None and bool(rank.children()), agent, "a save in progress", every=0.005)
        os.killpg(rank.pid, signal.SIGTERM)
        assert agent.wait(timeout=120) == 0
    finally:
        for group in (agent.pid, rank.pid):  # the rank leads its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    trained = max(owner.losses())
    assert owner.latest() == trained, f"trained to {trained}, last complete checkpoint {owner.latest()}: steps lost"
    _complete_and_intact(owner.ckpt, trained)


def test_kill_9_mid_save_leaves_no_process_behind_and_a_relaunch_resumes(root: Path) -> None:
    run = Run(root, "killed", 1, "train.train_iters=15")
    agent = run.start()
    rank = _rank(agent)
    family: list[psutil.Process] = []

    def saving() -> bool:  # a save after the first one is being written: its writers are the rank's children
        family[:] = rank.children(recursive=True) if run.latest() is not None else []
        return bool(family)

    _wait(saving, agent, "a save after the first", every=0.005)
    rank.kill()
    assert agent.wait(timeout=120) != 0
    alive = _survivors(family, within=5)
    assert not alive, f"processes outlived their rank: {[(p.pid, p.name()) for p in alive]}"
    saved = run.latest()
    assert saved is not None and verify(run.ckpt / f"iter_{saved:07d}") is None
    before = run.losses()
    output = run.run()  # its .lock was left by a dead process: no obstacle
    assert f"at step {saved}" in output and "resumed from" in output
    _assert_close(run.losses(), before, range(saved + 1, max(before) + 1), f"resumed at {saved} after kill -9")
    _complete_and_intact(run.ckpt, 15)


@contextlib.contextmanager
def _small_filesystem(path: Path, megabytes: int) -> Iterator[Path]:
    path.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    """Take every free byte of the file system, as another job writing there would."""
    chunk = b"\0" * (1 << 20)
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(chunk)


def test_disk_filling_up_during_a_save_is_reported_and_the_previous_checkpoint_kept(root: Path) -> None:
    with _small_filesystem(root / "disk_mid", 40) as disk:  # room for two checkpoints of ~13.7 MB
        run = Run(root, "disk_mid", 1, "train.train_iters=10", ckpt=disk / "ckpt")
        proc = run.start_one_rank()
        _wait(lambda: (run.ckpt / ".tmp_iter_0000010").exists(), proc, "the second save", every=0.002)
        _fill(disk)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr[-3000:]
        assert f"disk full at {run.ckpt}" in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert run.latest() == 5
        _complete_and_intact(run.ckpt, 5)  # lost: steps 6-10, the ones since the last completed save


def test_a_save_that_cannot_fit_is_refused_before_writing(root: Path) -> None:
    with _small_filesystem(root / "disk_pre", 20) as disk:  # room for one checkpoint
        run = Run(root, "disk_pre", 1, "train.train_iters=10", ckpt=disk / "ckpt")
        proc = run.start_one_rank()
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-3000:]
        assert f"disk full at {run.ckpt}: checkpoint step 10 does not fit" in stderr, stderr[-3000:]
        assert run.latest() == 5
        _complete_and_intact(run.ckpt, 5)
