"""The README's main job with its rendezvous port taken, and what multi-node commands tell other machines.

The issue's first-hour failure: `recipec launch llama3_tiny` with port 29500 held by another
program gave ~100 lines of torch traceback (a holder that answers) or hung with no output (a
holder that accepts and never answers). A one-node job now uses torchrun's standalone
rendezvous on a port the kernel picks, so both complete. The holder takes 29500 itself when
it is free; when something else already has 29500 (another test run on this machine), that is
the situation under test anyway, and the holder takes a kernel-picked port that the launch is
then configured with (launch.master_port), so parallel runs never depend on each other.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from launch_helpers import clean_env, recipec_cmd
from port_holders import PortHolder, hold
from recipec.compiler.cli import main

DEFAULT_PORT = 29500
STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["answering", "silent"])
def test_the_main_job_completes_with_its_port_held(workdir: Path, kind: str) -> None:
    holder = hold(kind, DEFAULT_PORT)
    args = ["launch", "llama3_tiny", "train.train_iters=2", "logging.log_interval=1", "train.eval_interval=1000",
            "-o", "build/tiny"]
    if holder.port != DEFAULT_PORT:
        args.append(f"launch.master_port={holder.port}")
    start = time.monotonic()
    try:
        proc = subprocess.run(recipec_cmd(*args), cwd=workdir, env=clean_env(), capture_output=True, text=True,
                              timeout=840, check=False)
    finally:
        holder.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "--standalone" in out and "--rdzv-endpoint" not in out  # the command the launcher ran
    assert [int(m.group(1)) for m in STEP.finditer(out)][-1:] == [2], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    print(f"main job with a {kind} holder on port {holder.port}: {time.monotonic() - start:.1f} s")


def _launch(*args: str):
    return CliRunner().invoke(main, ["launch", *args])


@pytest.mark.parametrize("recipe", ["llama3_tiny", "llama3_8b"])
def test_two_node_dry_run_never_sends_other_nodes_to_loopback(workdir: Path, recipe: str) -> None:
    result = _launch(recipe, "--nodes", "2", "--dry-run", "-o", "out")
    assert result.exit_code == 0, result.output
    assert "127.0.0.1" not in result.stdout and "localhost" not in result.stdout
    assert result.stdout.count('--rdzv-endpoint="$HEAD_NODE":29500') == 2
    assert 'HEAD_NODE="${HEAD_NODE:?set HEAD_NODE to the address of node 0' in result.stdout
    assert "recipec: warning: launch.master_addr is 127.0.0.1, a loopback address the other nodes cannot reach" \
        in result.stderr
    assert "--master ADDR_OF_NODE_0" in result.stderr
    script = (workdir / "out" / "launch.sh").read_text()
    assert "127.0.0.1" not in script and '--rdzv-endpoint="$HEAD_NODE":29500' in script


def test_two_node_dry_run_with_a_master_address(workdir: Path) -> None:
    result = _launch("llama3_tiny", "--nodes", "2", "--master", "10.1.2.3:29511", "--dry-run", "-o", "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("--rdzv-endpoint=10.1.2.3:29511 --rdzv-id=llama3_tiny --rdzv-conf=join_timeout=600") == 2
    assert "HEAD_NODE" not in result.stdout and "warning" not in result.stderr


@pytest.mark.parametrize("kind", ["answering", "silent"])
def test_the_head_node_refuses_a_taken_master_port(workdir: Path, kind: str) -> None:
    holder = PortHolder(kind)
    try:
        start = time.monotonic()
        result = _launch("llama3_tiny", "--nodes", "2", "--node-rank", "0", "--master", f"127.0.0.1:{holder.port}",
                         "-o", "out")
        seconds = time.monotonic() - start
    finally:
        holder.close()
    assert result.exit_code == 2, result.output
    assert f"[launch.master_port] port {holder.port} (launch.master_port) is already in use" in result.output
    assert "launch.master_port=PORT" in result.output and "Traceback" not in result.output
    assert seconds < 10 and not (workdir / "out").exists() and not (workdir / "runs").exists()
