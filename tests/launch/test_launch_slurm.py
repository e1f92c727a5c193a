"""`recipec launch --executor slurm` against a real SLURM controller (CI: bash .ci/slurm_setup.sh).

Skipped unless `sinfo` answers. The job runs in a scratch directory (the submission
directory is the job's working directory).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import clean_env, recipec_cmd

pytestmark = pytest.mark.timeout(900)

def _resumed(text: str, saved_at: int) -> bool:
    """The runtime says it picked up the checkpoint of step `saved_at`."""
    return re.search(rf"continuing at step {saved_at + 1}\b|resumed from \S+ at step {saved_at}\b", text) is not None


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job_id: str, until, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job_id)
        if until(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} still {_job(job_id).get('JobState')} after {timeout}s")


def _submit(workdir: Path, *overrides: str) -> tuple[str, Path]:
    proc = subprocess.run(recipec_cmd("launch", "llama3_tiny", "--executor", "slurm", "launch.gpus_per_node=1",
                                      "-o", "build/tiny", *overrides),
                          cwd=workdir, env=clean_env(), check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().splitlines()[0]
    assert job_id.isdigit(), proc.stdout
    assert f"submitted llama3_tiny as SLURM job {job_id}" in proc.stderr
    assert (workdir / "build" / "tiny" / "job.sbatch").is_file()
    return job_id, workdir / "runs" / "llama3_tiny" / "logs" / f"llama3_tiny-{job_id}.out"


def test_slurm_job_is_submitted_runs_and_logs(slurm: None, workdir: Path, free_port: int) -> None:
    job_id, log = _submit(workdir, "train.train_iters=6", "logging.log_interval=1", f"launch.master_port={free_port}")
    info = _wait(job_id, lambda i: i.get("JobState") in TERMINAL)
    text = log.read_text()
    assert f"recipec: job {job_id} (restart 0) on 1 node(s)" in text
    assert "recipec: ranks exited with status" in text
    assert "torch.distributed.run" in (workdir / "build" / "tiny" / "job.sbatch").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert re.search(r"\[default0\]:.*step\s+6/6 \| loss", text), text[-4000:]


def test_slurm_preemption_signal_saves_requeues_and_resumes(slurm: None, workdir: Path, free_port: int) -> None:
    job_id, log = _submit(workdir, "train.train_iters=40", "logging.log_interval=1", "train.eval_interval=1000",
                          f"launch.master_port={free_port}")
    # what SLURM does preempt_grace_s before the time limit: USR1 to the batch shell only
    _wait(job_id, lambda i: log.is_file() and re.search(r"step\s+\d+/40 \| loss", log.read_text()) is not None)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    _wait(job_id, lambda i: int(i.get("Restarts", "0")) >= 1)
    # A requeued job waits out its old credential (AuthInfo=cred_expire: ~11 s under .ci/slurm_setup.sh,
    # 2 min by SLURM's default) before it starts again.
    info = _wait(job_id, lambda i: int(i.get("Restarts", "0")) >= 1 and i.get("JobState") in TERMINAL)
    text = log.read_text()
    assert "recipec: SIGUSR1 received; asking the ranks to save a checkpoint and stop" in text
    stopped = re.search(r"stopping at step (\d+) on signal", text)
    assert stopped, text[-4000:]
    assert f"requeueing job {job_id}" in text
    assert f"recipec: job {job_id} (restart 1)" in text
    assert _resumed(text, int(stopped.group(1))), text[-4000:]
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert re.search(r"step\s+40/40 \| loss", text)
