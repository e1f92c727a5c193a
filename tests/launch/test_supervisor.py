"""The supervisor (`python -m recipec.compiler.supervisor -- torchrun ...`) with a fake torchrun: no torch needed.

The fake agent behaves as torchrun's does where it matters: it starts one rank process and
waits for it; a SIGTERM reaching the agent makes it SIGKILL the rank (torchrun would kill the
rank's process group, checkpoint writers included) and exit 1. The fake rank answers
SIGTERM/SIGUSR1 by "saving" (a file) and exiting 0, as the runtime does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENT = '''
import signal, subprocess, sys
rank = subprocess.Popen([sys.executable, {rank!r}, {folder!r}])
def agent_stop(signum, frame):
    rank.kill()
    sys.exit(1)
signal.signal(signal.SIGTERM, agent_stop)
sys.exit(rank.wait())
'''

RANK = '''
import os, signal, sys, time
folder = sys.argv[1]
slow = os.path.exists(os.path.join(folder, "slow"))
def save(signum, frame):
    open(os.path.join(folder, "saved-" + signal.Signals(signum).name), "w").close()
    if not slow:
        sys.exit(0)
signal.signal(signal.SIGTERM, save)
signal.signal(signal.SIGUSR1, save)
open(os.path.join(folder, "ready"), "w").close()
while True:
    time.sleep(0.05)
'''

REPORT = '''
import sys
sys.stderr.write("[default0]:recipec: error: [data.paths] no text file at 'x'\\n")
sys.stderr.write("W1129 15:45:06.916000 18371 torch/distributed/elastic/multiprocessing/api.py:1028] Sending "
                 "process 4716 closing signal SIGTERM\\n")
sys.stderr.write("[default1]:recipec: error: [data.paths] no text file at 'x'\\n")
sys.stderr.write("E1129 15:30:27.535000 4703 torch/distributed/elastic/multiprocessing/api.py:1002] failed "
                 "(exitcode: {code}) local_rank: 0 (pid: 4715) of binary: python\\n")
sys.stderr.write("""Traceback (most recent call last):
  File "run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
recipec.runtime.train FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_15:30:27
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 4715)
============================================================
""")
sys.exit(1)
'''


def _supervise(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipec.compiler.supervisor", "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def fake_torchrun(tmp_path: Path) -> list[str]:
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "agent.py").write_text(AGENT.format(rank=str(tmp_path / "rank.py"), folder=str(tmp_path)))
    return [sys.executable, str(tmp_path / "agent.py")]


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_reaches_the_rank_not_the_agent_and_exits_0(tmp_path: Path, fake_torchrun: list[str],
                                                                   sig: signal.Signals) -> None:
    proc = _supervise(*fake_torchrun)
    _wait_for(tmp_path / "ready")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    expected = "SIGUSR1" if sig == signal.SIGUSR1 else "SIGTERM"
    assert (tmp_path / f"saved-{expected}").exists()  # the rank saved; the agent did not kill it first
    assert f"recipec: {sig.name}: asking 1 rank(s) to save a checkpoint and stop" in err
    assert "run the same command again to resume" in err


def test_a_second_signal_stops_at_once(tmp_path: Path, fake_torchrun: list[str]) -> None:
    (tmp_path / "slow").touch()  # the rank's "save" never ends
    proc = _supervise(*fake_torchrun)
    _wait_for(tmp_path / "ready")
    proc.send_signal(signal.SIGTERM)
    _wait_for(tmp_path / "saved-SIGTERM")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopping torchrun (SIGTERM)" in err


def test_no_signal_passes_the_exit_code_through(tmp_path: Path) -> None:
    proc = _supervise(sys.executable, "-c", "import sys; print('out'); sys.exit(3)")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and out == "out\n" and err == ""


def test_a_ranks_user_error_exits_2_without_torchruns_report(tmp_path: Path) -> None:
    (tmp_path / "torchrun.py").write_text(REPORT.format(code=2))
    proc = _supervise(sys.executable, str(tmp_path / "torchrun.py"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err == "[default0]:recipec: error: [data.paths] no text file at 'x'\n"  # once, not once per rank


def test_any_other_failure_keeps_torchruns_report_and_code(tmp_path: Path) -> None:
    (tmp_path / "torchrun.py").write_text(REPORT.format(code=1))
    proc = _supervise(sys.executable, str(tmp_path / "torchrun.py"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "recipec: error:" in err and "ChildFailedError" in err and "exitcode  : 1" in err


def test_a_missing_torchrun_is_a_message(tmp_path: Path) -> None:
    proc = _supervise(str(tmp_path / "no-such-torchrun"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 127 and "recipec: error: cannot start" in err and "Traceback" not in err


def test_the_supervisor_imports_no_torch() -> None:
    code = ("import sys, recipec.compiler.supervisor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'click')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
