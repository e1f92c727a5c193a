"""`recipec launch` and launch.sh for real: CPU processes through torchrun, stopped runs that resume.

Runs the CLI (or the generated launch.sh) as a subprocess in a scratch directory
(checkpoints under runs/ there). A stop signal to the launcher must end in a completed
checkpoint at the step it stopped, exit 0 and nothing half-written; the relaunch resumes
from it. A rank's user error (exit 2) comes back as exit 2 with the rank's message only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from launch_helpers import STEP, clean_env, recipec_cmd, signal_mid_run


def _resumed(text: str, saved_at: int) -> bool:
    """The runtime says it picked up the checkpoint of step `saved_at`."""
    return re.search(rf"continuing at step {saved_at + 1}\b|resumed from \S+ at step {saved_at}\b", text) is not None


pytestmark = [pytest.mark.timeout(900)]



def _launch_args(port: int, iters: int) -> list[str]:
    return ["launch", "llama3_tiny", "launch.gpus_per_node=2", f"train.train_iters={iters}",
            "logging.log_interval=1", "train.eval_interval=1000", f"launch.master_port={port}", "-o", "build/tiny"]


def test_two_process_run_through_torchrun(workdir: Path, free_port: int) -> None:
    proc = subprocess.run(recipec_cmd(*_launch_args(free_port, 6)), cwd=workdir, env=clean_env(),
                          check=False, capture_output=True, text=True, timeout=840)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2" in out
    assert "[default0]:" in out and "on 2 rank(s)" in out  # both ranks came up; rank 0 speaks for them
    steps = [int(m.group(1)) for m in STEP.finditer(out)]
    assert steps and steps[-1] == 6, out[-4000:]
    assert any((workdir / "runs" / "llama3_tiny" / "checkpoints").iterdir())
    assert (workdir / "build" / "tiny" / "plan.json").is_file()


def _saved_step(out: str, workdir: Path, iters: int) -> int:
    """The step the stopped run saved at: a complete checkpoint there, nothing half-written anywhere."""
    stopped = re.search(r"stopping at step (\d+) on signal", out)
    assert stopped, out[-4000:]
    saved_at = int(stopped.group(1))
    assert saved_at < iters
    checkpoints = workdir / "runs" / "llama3_tiny" / "checkpoints"
    assert (checkpoints / f"iter_{saved_at:07d}" / "recipec_manifest.json").is_file(), sorted(checkpoints.iterdir())
    assert not list(checkpoints.glob(".tmp_iter_*")), sorted(checkpoints.iterdir())
    assert "Traceback" not in out and "BrokenPipeError" not in out, out[-4000:]
    return saved_at


def _check_resumed(argv: list[str], workdir: Path, saved_at: int, iters: int) -> None:
    again = subprocess.run(argv, cwd=workdir, env=clean_env(), check=False, capture_output=True, text=True, timeout=840)
    second = again.stdout + again.stderr
    assert again.returncode == 0, second[-4000:]
    assert _resumed(second, saved_at), second[-4000:]
    steps = [int(m.group(1)) for m in STEP.finditer(second)]
    assert steps[0] == saved_at + 1 and steps[-1] == iters


def test_stopped_run_saves_and_the_relaunch_resumes(workdir: Path, free_port: int) -> None:
    args = _launch_args(free_port, 40)
    code, first = signal_mid_run(recipec_cmd(*args), workdir)
    assert code == 0, first[-4000:]  # the ranks saved and exited cleanly: a clean stop
    assert "asking 2 rank(s) to save a checkpoint" in first
    assert "stopped on SIGTERM after the ranks saved" in first
    saved_at = _saved_step(first, workdir, 40)
    _check_resumed(recipec_cmd(*args), workdir, saved_at, 40)


def test_sigterm_to_launch_sh_saves_and_the_relaunch_resumes(workdir: Path, free_port: int) -> None:
    # The build directory's own script, as a user or a scheduler runs it: SIGTERM lands on launch.sh.
    args = [a for a in _launch_args(free_port, 30) if a != "launch.gpus_per_node=2"]
    built = subprocess.run(recipec_cmd(*args, "--dry-run"), cwd=workdir, env=clean_env(), check=False, capture_output=True,
                           text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    script = ["bash", str(workdir / "build" / "tiny" / "launch.sh")]
    code, first = signal_mid_run(script, workdir)
    assert code == 0, first[-4000:]
    assert "asking 1 rank(s) to save a checkpoint" in first
    saved_at = _saved_step(first, workdir, 30)
    _check_resumed(script, workdir, saved_at, 30)


def test_a_ranks_user_error_exits_2_with_its_message_only(workdir: Path, free_port: int) -> None:
    proc = subprocess.run(recipec_cmd("launch", "llama3_tiny", 'data.paths=["no-such-corpus.txt"]',
                                      f"launch.master_port={free_port}", "-o", "build/tiny"),
                          cwd=workdir, env=clean_env(), check=False, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "recipec: error: [data.paths]" in out and "no-such-corpus.txt" in out
    assert "ChildFailedError" not in out and "Traceback" not in out and "exitcode" not in out, out[-4000:]
