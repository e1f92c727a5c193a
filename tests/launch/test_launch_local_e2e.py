"""`recipec launch` for real: two CPU processes through torchrun, then a stopped run that resumes.

Runs the CLI as a subprocess in a scratch directory (checkpoints under runs/ there).
Skipped only while `recipec.runtime.train` is not importable.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_helpers import clean_env, recipec_cmd

def _resumed(text: str, saved_at: int) -> bool:
    """The runtime says it picked up the checkpoint of step `saved_at`."""
    return re.search(rf"continuing at step {saved_at + 1}\b|resumed from \S+ at step {saved_at}\b", text) is not None


pytestmark = [pytest.mark.timeout(900)]

STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss")


def _launch_args(port: int, iters: int) -> list[str]:
    return ["launch", "llama3_tiny", "launch.gpus_per_node=2", f"train.train_iters={iters}",
            "logging.log_interval=1", "train.eval_interval=1000", f"launch.master_port={port}", "-o", "build/tiny"]


def test_two_process_run_through_torchrun(workdir: Path, free_port: int) -> None:
    proc = subprocess.run(recipec_cmd(*_launch_args(free_port, 6)), cwd=workdir, env=clean_env(),
                          capture_output=True, text=True, timeout=840)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2" in out
    assert "[default0]:" in out and "[default1]:" in out  # both ranks streamed, prefixed
    steps = [int(m.group(1)) for m in STEP.finditer(out)]
    assert steps and steps[-1] == 6, out[-4000:]
    assert any((workdir / "runs" / "llama3_tiny" / "checkpoints").iterdir())
    assert (workdir / "build" / "tiny" / "plan.json").is_file()


def test_stopped_run_saves_and_the_relaunch_resumes(workdir: Path, free_port: int) -> None:
    args = _launch_args(free_port, 40)
    proc = subprocess.Popen(recipec_cmd(*args), cwd=workdir, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if STEP.search(line):  # training is under way: stop it the way a user or scheduler would
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-50:])
    lines += proc.stdout.readlines()
    code = proc.wait(timeout=300)
    first = "".join(lines)
    assert code == 128 + signal.SIGTERM, first[-4000:]
    assert "asking 2 rank(s) to save a checkpoint" in first
    stopped = re.search(r"stopping at step (\d+) on signal", first)
    assert stopped, first[-4000:]
    saved_at = int(stopped.group(1))
    assert saved_at < 40

    again = subprocess.run(recipec_cmd(*args), cwd=workdir, env=clean_env(), capture_output=True, text=True,
                           timeout=840)
    second = again.stdout + again.stderr
    assert again.returncode == 0, second[-4000:]
    assert _resumed(second, saved_at), second[-4000:]
    steps = [int(m.group(1)) for m in STEP.finditer(second)]
    assert steps[0] == saved_at + 1 and steps[-1] == 40
