"""`recipec launch` through click's CliRunner: bad input exits 2 with a clean message, dry runs, plugins.

No torch and no SLURM needed. "Nothing submitted" is checked without fakes: PATH holds no
`sbatch` at all, and no job script or build directory is left behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from recipec.compiler.cli import main


def _run(args: list[str], path: str | None = None):
    env = {"PATH": path} if path is not None else None
    result = CliRunner().invoke(main, ["launch", *args], env=env)
    return result, result.output  # click >= 8.2: stdout and stderr interleaved


def _user_error(result, text: str) -> None:
    assert result.exit_code == 2, text
    assert "recipec: error:" in text
    assert "Traceback" not in text
    assert isinstance(result.exception, SystemExit)


@pytest.fixture
def no_sbatch_path(tmp_path: Path) -> str:
    empty = tmp_path / "bin-without-sbatch"
    empty.mkdir()
    return str(empty)


def test_nodes_times_gpus_that_do_not_fit_the_layout(workdir: Path, no_sbatch_path: str) -> None:
    # llama3_8b has context parallel 2: 1 x 3 ranks cannot hold it.
    result, text = _run(["llama3_8b", "--gpus-per-node", "3", "--executor", "slurm", "-o", "out"], no_sbatch_path)
    _user_error(result, text)
    assert "world size 3" in text and "not divisible" in text
    assert not (workdir / "out").exists()


def test_sbatch_missing_from_path(workdir: Path, no_sbatch_path: str) -> None:
    result, text = _run(["llama3_tiny", "--executor", "slurm", "-o", "out"], no_sbatch_path)
    _user_error(result, text)
    assert "`sbatch` is not on PATH" in text
    assert not (workdir / "out" / "job.sbatch").exists()
    assert "as SLURM job" not in text


def test_unknown_executor(workdir: Path, no_sbatch_path: str) -> None:
    result, text = _run(["llama3_tiny", "--executor", "kubernetes", "-o", "out"], no_sbatch_path)
    _user_error(result, text)
    assert "kubernetes" in text and "'slurm'" in text and "launch.executor" in text
    assert not (workdir / "out").exists()


def test_unknown_executor_as_override(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "launch.executor=k8s", "--dry-run", "-o", "out"])
    _user_error(result, text)
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("override, words", [
    ("model.num_attention_heads=5", "num_attention_heads"),
    ("train.iters=5", "train.iters"),
    ("launch.nodes=0", "launch.nodes"),
])
def test_recipe_that_fails_validation(workdir: Path, no_sbatch_path: str, override: str, words: str) -> None:
    result, text = _run(["llama3_tiny", override, "--executor", "slurm", "-o", "out"], no_sbatch_path)
    _user_error(result, text)
    assert words in text
    assert not (workdir / "out").exists()


def test_nodes_flag_that_is_not_a_number(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--nodes", "two", "--dry-run", "-o", "out"])
    _user_error(result, text)
    assert "launch.nodes" in text


def test_node_rank_outside_the_job(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--nodes", "2", "--node-rank", "2", "--master", "10.0.0.1", "-o", "out"])
    _user_error(result, text)
    assert "0..1" in text


def test_node_rank_under_slurm(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--executor", "slurm", "--node-rank", "0", "--dry-run", "-o", "out"])
    _user_error(result, text)
    assert "$SLURM_NODEID" in text


def test_bad_master(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--master", ":29500", "--dry-run", "-o", "out"])
    _user_error(result, text)
    result, text = _run(["llama3_tiny", "--master", "host:port", "--dry-run", "-o", "out"])
    _user_error(result, text)
    assert "launch.master_port" in text


def test_slurm_dry_run_prints_the_script_and_submits_nothing(workdir: Path, no_sbatch_path: str) -> None:
    result, text = _run(["llama3_tiny", "--executor", "slurm", "--nodes", "2", "launch.slurm_account=proj",
                         "launch.slurm_partition=batch", "--dry-run", "-o", "out"], no_sbatch_path)
    assert result.exit_code == 0, text
    script = (workdir / "out" / "job.sbatch").read_text()
    assert script in result.output
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --account=proj", "#SBATCH --partition=batch", "#SBATCH --exclusive",
                 "#SBATCH --time=04:00:00", "#SBATCH --output=runs/llama3_tiny/logs/%x-%j.out",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"]:
        assert line in script
    assert "--gpus-per-node" not in script  # CPU recipe
    assert f"{sys.executable} -m torch.distributed.run" in script
    assert "nothing submitted" in text
    # the build directory is complete and says what the flags set
    plan = json.loads((workdir / "out" / "plan.json").read_text())
    assert plan["config"]["launch"]["nodes"] == 2 and plan["config"]["launch"]["executor"] == "slurm"
    assert not (workdir / "runs").exists()  # the log directory is made only on submission


def test_local_dry_run_prints_the_command(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "launch.gpus_per_node=2", "train.train_iters=6", "--dry-run", "-o", "out"])
    assert result.exit_code == 0, text
    out = result.output
    assert f"{sys.executable} -m torch.distributed.run --nnodes=1 --nproc-per-node=2 --node-rank=0" in out
    # one node: torchrun's standalone rendezvous on a port the kernel picks; launch.master_port is not used
    assert "--standalone" in out and "--rdzv-endpoint" not in out and "29500" not in out
    assert "--max-restarts=0" in out and "--tee=3" in out
    assert "-m recipec.runtime.train --artifact out" in out
    assert "export OMP_NUM_THREADS=1" in out  # the plan's performance environment
    assert "nothing started" in text
    assert (workdir / "out" / "launch.sh").is_file()


def test_two_nodes_without_scheduler_print_each_nodes_command(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--nodes", "2", "--master", "10.1.2.3:29511", "-o", "out"])
    assert result.exit_code == 0, text
    for k in (0, 1):
        assert f"--nnodes=2 --nproc-per-node=1 --node-rank={k} --rdzv-backend=c10d " \
               f"--rdzv-endpoint=10.1.2.3:29511" in result.output
    assert "--node-rank K --master" in result.output


def test_nsys_plugin_wraps_each_rank(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "profiling.use_nsys=true", "--dry-run", "-o", "out"])
    assert result.exit_code == 0, text
    assert ("--no-python nsys profile -c cudaProfilerApi --capture-range-end=stop --force-overwrite=true "
            "-o 'runs/llama3_tiny/nsys/llama3_tiny-rank%q{RANK}' " + sys.executable
            + " -m recipec.runtime.train") in result.output
    result, text = _run(["llama3_tiny", "profiling.use_nsys=true", "--executor", "slurm", "--dry-run", "-o", "o2"])
    assert 'nsys profile -c cudaProfilerApi --capture-range-end=stop' in result.output


def test_container_plugin_in_the_job_script(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--executor", "slurm", "launch.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                         'launch.container_mounts=["/data:/data","/ckpt:/ckpt"]', "--dry-run", "-o", "out"])
    assert result.exit_code == 0, text
    assert ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=1 "
            "--container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/data:/data,/ckpt:/ckpt "
            '--container-workdir="$SLURM_SUBMIT_DIR"') in result.output
    # the image's python runs the supervisor and the image's torchrun
    assert 'exec python -m recipec.compiler.supervisor -- torchrun --nnodes="$SLURM_NNODES"' in result.output


def test_no_requeue_when_disabled(workdir: Path) -> None:
    result, text = _run(["llama3_tiny", "--executor", "slurm", "launch.slurm_requeue=false",
                         "launch.slurm_exclusive=false", "--dry-run", "-o", "out"])
    assert result.exit_code == 0, text
    assert "#SBATCH --requeue" not in result.output and "REQUEUE_ON_USR1=0" in result.output
    assert "--exclusive" not in result.output


def test_launch_module_imports_no_torch() -> None:
    import subprocess

    code = ("import sys, recipec.compiler.launcher, recipec.compiler.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
