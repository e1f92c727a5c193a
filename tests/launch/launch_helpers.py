"""Helpers and fixtures for the launcher tests: a scratch working directory, free ports, runtime and SLURM gates.

Most tests need neither torch nor SLURM. The end-to-end ones skip while
`recipec.runtime.train` is not importable (runtime gate) or while no SLURM
controller answers `sinfo` (SLURM gate: `bash .ci/slurm_setup.sh` starts one).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def slurm_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states)


@pytest.fixture
def slurm() -> None:
    """Skip unless a SLURM controller answers with a usable node (CI: bash .ci/slurm_setup.sh)."""
    if not slurm_answers():
        pytest.skip("no SLURM controller answers `sinfo` (run `bash .ci/slurm_setup.sh` as root)")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch cwd: build/ and runs/ (checkpoints, logs) land here, not in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it): every test's one
    helper for a rendezvous or MASTER_PORT (tests/runtime, tests/hf via hfutil, tests/gpu)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return free_tcp_port()


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """`torchrun` through this interpreter with `nproc` local workers and a c10d rendezvous on a free
    port, then `args` (e.g. "-m", "recipec.runtime.train", "--artifact", DIR): the tests' one launcher
    of a hand-made torchrun (`recipec launch` makes its own)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_tcp_port()}", *args]


def recipec_cmd(*args: str) -> list[str]:
    """The `recipec` CLI through this interpreter (the venv's), as a subprocess."""
    return [sys.executable, "-m", "recipec.compiler.cli", *args]


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RECIPEC_UPDATE_GOLDEN", None)
    return env


STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss")


def signal_mid_run(argv: list[str], cwd: Path, sig: int = signal.SIGTERM,
                   env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start `argv`, send `sig` once training is under way (as a user or scheduler would); (exit code, output)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if STEP.search(line):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines[-50:])
    lines += proc.stdout.readlines()
    return proc.wait(timeout=300), "".join(lines)
