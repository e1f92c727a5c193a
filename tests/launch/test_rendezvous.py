"""The rendezvous cannot collide and cannot hang (compiler/rendezvous.py, the supervisor's checks).

Most tests run the supervisor against a fake `torchrun` (a script of that name), so they need
no torch and take a second or two; one runs torch's own torchrun into a port holder that
accepts and never answers, the case that used to hang with no output at all. Every port is
one the kernel handed out to this test (a PortHolder on port 0), so tests running in parallel
never meet each other.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from port_holders import PortHolder
from recipec.compiler import build
from recipec.compiler.executors.node import node_argv
from recipec.compiler.rendezvous import (
    JOIN_TIMEOUT_S,
    failure_message,
    head_port_problem,
    hosted_here,
    of_argv,
    port_in_use,
)
from recipec.compiler.shell import literal

FAKE_TORCHRUN = '''#!{python}
import os, sys, time
open(os.path.join({folder!r}, "started"), "w").close()
if {mode!r} == "hang":
    time.sleep(600)
if {mode!r} == "torch-timeout":
    sys.stderr.write("""Traceback (most recent call last):
  File "torch/distributed/elastic/rendezvous/dynamic_rendezvous.py", line 680, in run
    raise RendezvousTimeoutError
torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError
""")
    sys.exit(1)
'''


@pytest.fixture
def holder():
    held: list[PortHolder] = []

    def make(kind: str) -> PortHolder:
        held.append(PortHolder(kind))
        return held[-1]

    yield make
    for h in held:
        h.close()


def _fake_torchrun(folder: Path, mode: str) -> str:
    path = folder / "torchrun"
    path.write_text(FAKE_TORCHRUN.format(python=sys.executable, folder=str(folder), mode=mode))
    path.chmod(0o755)
    return str(path)


def _supervise(argv: list[str], timeout: float = 120) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.supervisor", "--", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _multi_node(torchrun: list[str], rank: int, endpoint: str, join: int | None = None) -> list[str]:
    conf = [f"--rdzv-conf=join_timeout={join}"] if join is not None else []
    return [*torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", "--rdzv-id=t", *conf, "--max-restarts=0", "--no-python", "true"]


def test_the_generated_commands_read_back() -> None:
    one = of_argv(literal(node_argv(build("llama3_tiny"), 0, python=sys.executable)))
    assert one is not None and one.standalone and not one.multi_node
    two = of_argv(literal(node_argv(build("llama3_tiny", ["launch.nodes=2", 'launch.master_addr="10.1.2.3"']), 1, python="py")))
    assert two is not None and two.multi_node and (two.host, two.port, two.node_rank) == ("10.1.2.3", 29500, "1")
    assert two.join_timeout_s == JOIN_TIMEOUT_S and two.watchdog_s == JOIN_TIMEOUT_S + 60
    spaced = of_argv(["torchrun", "--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "[::1]:7", "x.py"])
    assert spaced is not None and (spaced.host, spaced.port, spaced.node_rank) == ("::1", 7, "0")
    assert of_argv([sys.executable, "-c", "print(1)"]) is None  # not torchrun: no rendezvous checks


def test_a_held_port_is_in_use_and_a_free_one_is_not(holder) -> None:
    for kind in ("answering", "silent"):
        assert port_in_use(holder(kind).port)
    spare = PortHolder("silent")
    port = spare.port
    spare.close()
    assert not port_in_use(port)
    assert hosted_here("127.0.0.1") and hosted_here("localhost")
    assert not hosted_here("192.0.2.1")  # TEST-NET-1: never an address of this machine


def test_only_node_0_checks_the_port(holder) -> None:
    port = holder("silent").port
    head = of_argv(_multi_node(["torchrun"], 0, f"127.0.0.1:{port}"))
    assert head is not None
    message, fix = head_port_problem(head)
    assert f"port {port} (launch.master_port) is already in use" in message
    assert "launch.master_port=PORT" in fix and "--master 127.0.0.1:PORT" in fix
    other = of_argv(_multi_node(["torchrun"], 1, f"127.0.0.1:{port}"))
    assert other is not None and head_port_problem(other) is None  # node 1 connects to node 0's store
    elsewhere = of_argv(_multi_node(["torchrun"], 0, f"192.0.2.1:{port}"))
    assert elsewhere is not None and head_port_problem(elsewhere) is None  # the store is not hosted here


@pytest.mark.parametrize("kind", ["answering", "silent"])
def test_the_head_node_refuses_a_taken_port_before_torchrun_starts(tmp_path: Path, holder, kind: str) -> None:
    port = holder(kind).port
    torchrun = _fake_torchrun(tmp_path, "ok")
    code, out, seconds = _supervise(_multi_node([torchrun], 0, f"127.0.0.1:{port}"))
    assert code == 2, out
    assert f"recipec: error: port {port} (launch.master_port) is already in use" in out
    assert "hint:" in out and "Traceback" not in out
    assert not (tmp_path / "started").exists()  # torchrun never ran
    assert seconds < 20


def test_torchs_rendezvous_error_becomes_exit_2_naming_the_endpoint(tmp_path: Path) -> None:
    torchrun = _fake_torchrun(tmp_path, "torch-timeout")
    code, out, _ = _supervise(_multi_node([torchrun], 1, "10.9.8.7:29533"))
    assert code == 2, out
    assert "the rendezvous at 10.9.8.7:29533 failed (launch.master_addr = '10.9.8.7', launch.master_port = 29533" in out
    assert "torch: torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError" in out
    assert "Traceback" not in out and "File " not in out


def test_a_rendezvous_that_never_completes_is_stopped(tmp_path: Path) -> None:
    # A torchrun that never starts a rank (its store's host never answers): stopped after
    # join_timeout + min(60 s, join_timeout), here 1 + 1 s.
    torchrun = _fake_torchrun(tmp_path, "hang")
    code, out, seconds = _supervise(_multi_node([torchrun], 1, "10.9.8.7:29533", join=1))
    assert code == 2, out
    assert "the rendezvous at 10.9.8.7:29533 did not complete within 2 s" in out
    assert "launch.master_addr = '10.9.8.7'" in out and "launch.master_port = 29533" in out
    assert (tmp_path / "started").exists() and seconds < 30


def test_messages_name_the_keys_and_the_fix() -> None:
    rdzv = of_argv(_multi_node(["torchrun"], 1, "127.0.0.1:29500", join=30))
    assert rdzv is not None
    message, fix = failure_message(rdzv, waited_s=60)
    assert "did not complete within 60 s" in message and "no rank was started" in message
    assert "--node-rank K --master ADDR_OF_NODE_0" in fix and "within 30 s of each other" in fix
    assert "loopback" in fix


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch's torchrun")
def test_torchrun_into_a_silent_port_ends_with_exit_2_not_a_hang(holder) -> None:
    # Before: torchrun connected to the holder, waited for an answer forever and printed nothing.
    port = holder("silent").port
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    code, out, seconds = _supervise(_multi_node(torchrun, 1, f"127.0.0.1:{port}", join=5), timeout=180)
    assert code == 2, out
    assert f"the rendezvous at 127.0.0.1:{port}" in out and f"launch.master_port = {port}" in out
    assert "Traceback" not in out, out
    assert seconds < 90
