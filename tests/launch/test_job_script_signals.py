"""job.sbatch's signal path for real, without a SLURM controller: bash runs the job script with stub
`srun` (which becomes the task: `bash -c BODY`) and `scontrol` on PATH, and real torchrun ranks on CPU.

USR1 to the batch shell is what SLURM sends `preempt_grace_s` before the time limit. It must
reach the ranks through the script's `forward` and the supervised task, end in a completed
checkpoint, a job exit of 0 and a `scontrol requeue` — not in torchrun's agent killing the
ranks' checkpoint writers mid-save.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import clean_env, recipec_cmd, signal_mid_run
from script_stubs import StubBin, job_env

pytestmark = [pytest.mark.timeout(900)]



def test_usr1_to_the_job_script_saves_exits_0_and_requeues(workdir: Path, free_port: int) -> None:
    built = subprocess.run(recipec_cmd("launch", "llama3_tiny", "--executor", "slurm", "train.train_iters=30",
                                       "logging.log_interval=1", "train.eval_interval=1000",
                                       f"launch.master_port={free_port}", "-o", "build/tiny", "--dry-run"),
                           cwd=workdir, env=clean_env(), check=False, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    stubs = StubBin(workdir / "stub-bin", names=("srun", "scontrol"), head="127.0.0.1")
    env = {**clean_env(), **job_env(workdir),
           "PATH": f"{stubs.folder}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    code, out = signal_mid_run(["bash", "build/tiny/job.sbatch"], workdir, signal.SIGUSR1, env)
    assert code == 0, out[-4000:]
    assert "recipec: SIGUSR1 received; asking the ranks to save a checkpoint and stop" in out
    stopped = re.search(r"stopping at step (\d+) on signal", out)
    assert stopped, out[-4000:]
    checkpoints = workdir / "runs" / "llama3_tiny" / "checkpoints"
    assert (checkpoints / f"iter_{int(stopped.group(1)):07d}" / "recipec_manifest.json").is_file()
    assert not list(checkpoints.glob(".tmp_iter_*"))
    assert "requeueing job 4242" in out and "recipec: ranks exited with status 0" in out
    assert ["requeue", "4242"] in [c["argv"] for c in stubs.calls() if c["prog"] == "scontrol"]
    assert "Traceback" not in out, out[-4000:]
