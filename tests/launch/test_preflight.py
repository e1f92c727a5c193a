"""`recipec launch` refuses what this machine cannot run, before any rank starts (compiler/preflight.py).

Each refusal: exit 2 within seconds, `recipec: error:` with the key, where it was set and the
fix, no traceback, no build directory written, nothing started. The CLI runs in-process
(click's CliRunner) with the machine's GPUs and installed packages replaced where a test needs
a particular machine; two tests run the real CLI on this machine when it has no GPU / no TE.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from launch_helpers import clean_env, recipec_cmd
from recipec.compiler import build, preflight
from recipec.compiler.cli import main
from recipec.compiler.preflight import Gpus, gpus, local_modules_reason

SECONDS = 10  # "within seconds": compile + checks, no torch import
SP = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")


def _launch(*args: str) -> tuple[int, str, float]:
    start = time.monotonic()
    result = CliRunner().invoke(main, ["launch", *args])
    return result.exit_code, result.output, time.monotonic() - start


def _refused(code: int, text: str, seconds: float, workdir: Path) -> None:
    assert code == 2, text
    assert "recipec: error:" in text and "hint:" in text
    assert "Traceback" not in text
    assert seconds < SECONDS
    assert not (workdir / "out").exists()  # nothing written, nothing started
    assert not (workdir / "runs").exists()


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Set what this machine has: machine(gpus=N, have={"torch", ...})."""

    def set_(gpu_count: int = 0, have: frozenset[str] = frozenset({"torch"})) -> None:
        monkeypatch.setattr(preflight, "gpus", lambda: Gpus(gpu_count, f"{gpu_count} in a test"))
        monkeypatch.setattr(preflight, "installed", lambda module: module in have)

    return set_


def test_a_gpu_recipe_on_a_machine_without_gpus(workdir: Path, machine) -> None:
    machine(gpu_count=0)
    code, text, seconds = _launch("llama3_8b", "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "llama3_8b.toml" in text and "[launch.accelerator]" in text
    assert '"H100-80GB" means 8 GPU process(es) per node, but this machine has no NVIDIA GPU' in text
    assert 'launch.accelerator="cpu"' in text and "--executor slurm" in text


def test_more_processes_than_gpus(workdir: Path, machine) -> None:
    machine(gpu_count=2)
    code, text, seconds = _launch("llama3_8b", "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "[launch.gpus_per_node] 8 processes per node, one per GPU, but only 2 GPU(s)" in text
    assert "launch.gpus_per_node=2" in text


def test_sequence_parallel_on_local_modules(workdir: Path, machine) -> None:
    machine(gpu_count=8, have=frozenset({"torch"}))  # GPUs, but no transformer_engine and no apex
    code, text, seconds = _launch("llama3_8b", *SP, "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "CLI 'parallel.sequence_parallel=true'" in text and "[parallel.sequence_parallel]" in text
    assert "Megatron-Core's local modules" in text and "transformer_engine is not installed" in text
    assert "parallel.sequence_parallel=false" in text


def test_sequence_parallel_with_explicit_local_modules_even_with_te(workdir: Path, machine) -> None:
    machine(gpu_count=8, have=frozenset({"torch", "transformer_engine"}))
    code, text, seconds = _launch("llama3_8b", *SP, 'model.transformer_impl="local"', "-o", "out")
    _refused(code, text, seconds, workdir)
    assert 'model.transformer_impl is "local"' in text


def test_sequence_parallel_with_apex_norms_passes(workdir: Path, machine) -> None:
    machine(gpu_count=8, have=frozenset({"torch", "apex"}))  # local modules take Apex's fused LayerNorm
    built = build("llama3_8b", [*SP, "parallel.context_parallel_size=1"])  # (Apex gives no CP attention)
    assert preflight.machine_problems(built, built.tree.source, preflight.installed, preflight.gpus) == []


def test_no_torch(workdir: Path, machine) -> None:
    machine(have=frozenset())
    code, text, seconds = _launch("llama3_tiny", "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "torch is not installed" in text and "pip install -e '.[runtime]'" in text


def test_every_reason_at_once(workdir: Path, machine) -> None:
    machine(gpu_count=0, have=frozenset())
    code, text, seconds = _launch("llama3_8b", *SP, "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "4 problems" in text
    assert "torch is not installed" in text and "[launch.accelerator]" in text
    assert "[parallel.sequence_parallel]" in text and "[parallel.context_parallel_size]" in text


def test_context_parallel_on_local_modules(workdir: Path, machine) -> None:
    machine(gpu_count=8, have=frozenset({"torch", "apex"}))  # llama3_8b has CP 2; no TE attention here
    code, text, seconds = _launch("llama3_8b", "-o", "out")
    _refused(code, text, seconds, workdir)
    assert "[parallel.context_parallel_size] context parallelism needs Transformer Engine's attention" in text
    assert "transformer_engine is not installed" in text and "parallel.context_parallel_size=1" in text


@pytest.mark.parametrize("extra", [["--dry-run"], ["--executor", "slurm", "--dry-run"], ["--nodes", "2"]])
def test_dry_runs_and_slurm_are_not_checked_here(workdir: Path, machine, extra: list[str]) -> None:
    # a dry run starts nothing, and the login node that submits is not the machine that runs
    machine(gpu_count=0, have=frozenset())
    code, text, _ = _launch("llama3_8b", *SP, *extra, "-o", "out")
    assert code == 0, text


def test_what_runs_passes(workdir: Path, machine) -> None:
    machine(gpu_count=8, have=frozenset({"torch", "transformer_engine"}))
    built = build("llama3_8b", list(SP))
    assert preflight.machine_problems(built, built.tree.source, preflight.installed, preflight.gpus) == []
    assert local_modules_reason("auto", False, have_te=True) is None
    assert "torch_compile" in (local_modules_reason("auto", True, have_te=True) or "")
    assert local_modules_reason("transformer_engine", False, have_te=False) is None  # the runtime says it


def _dev(tmp_path: Path, *names: str) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        (dev / name).touch()
    return dev


def test_gpu_count_from_device_files_and_cuda_visible_devices(tmp_path: Path) -> None:
    dev = _dev(tmp_path, "nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia-caps")
    none = tmp_path / "no-proc"
    assert gpus({}, dev, none, None).count == 3
    cases = {"1": 1, "": 0, "-1": 0, "0,2": 2, "0,7,1": 1, "GPU-1a2b,GPU-3c4d": 2, "2,1,0,1": 3}
    for mask, count in cases.items():
        found = gpus({"CUDA_VISIBLE_DEVICES": mask}, dev, none, None)
        assert found.count == count, (mask, found)
        assert "CUDA_VISIBLE_DEVICES" in found.evidence


def test_gpu_count_from_proc_then_nvidia_smi(tmp_path: Path) -> None:
    empty = _dev(tmp_path, "null")
    proc = tmp_path / "gpus"
    for address in ("0000:07:00.0", "0000:0f:00.0"):
        (proc / address).mkdir(parents=True)
    assert gpus({}, empty, proc, None).count == 2
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    assert gpus({}, empty, tmp_path / "none", str(smi)).count == 2
    nothing = gpus({"CUDA_VISIBLE_DEVICES": "0"}, empty, tmp_path / "none", None)
    assert nothing.count == 0 and "no nvidia-smi" in nothing.evidence


@pytest.mark.skipif(gpus().count > 0, reason="this machine has a GPU")
def test_the_real_cli_on_this_gpu_less_machine(workdir: Path) -> None:
    # The case end to end: llama3_8b, 8 processes, here; it used to start 8 CPU ranks
    # of an 8B model and be OOM-killed after a minute.
    start = time.monotonic()
    proc = subprocess.run(recipec_cmd("launch", "llama3_8b", "-o", "out"), cwd=workdir, env=clean_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "this machine has no NVIDIA GPU" in out and "Traceback" not in out
    assert time.monotonic() - start < 30  # a fresh interpreter on a busy machine; no torch import
    assert not (workdir / "runs").exists()


@pytest.mark.skipif(preflight.installed("transformer_engine") or preflight.installed("apex"),
                    reason="TE or Apex installed: sequence parallel runs here")
def test_the_real_cli_refuses_sequence_parallel_without_te(workdir: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(recipec_cmd("launch", "llama3_tiny", "launch.gpus_per_node=2",
                                      "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                      "-o", "out"),
                          cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "[parallel.sequence_parallel]" in out and "Traceback" not in out
    assert time.monotonic() - start < 30
    assert not (workdir / "runs").exists()
