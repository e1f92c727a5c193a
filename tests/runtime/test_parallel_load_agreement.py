"""A fully parallel load fails on every data-parallel rank when one rank cannot read its share.

Megatron-Core 0.19 reads each rank's share with torch DCP's `no_dist=True`: the rank whose file is
damaged raises, the others go on into the exchange and wait for it forever (a DP=2 resume of a
checkpoint with one broken file hung; 0.16 agreed on the failure inside DCP). This drives
runtime/ckpt_state._failing_together on two gloo ranks with a read that fails on rank 1 only,
whatever megatron-core is installed: without the agreement rank 0 returns and then blocks in the
next collective (the stand-in for Megatron's exchange), and the test times out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, torchrun_cmd

SCRIPT = """
import json
import sys
import torch
import torch.distributed as dist
from recipec.runtime.device import activate_cpu_mode
activate_cpu_mode()
dist.init_process_group("gloo")
from recipec.runtime.ckpt_state import PeerLoadError, _failing_together

class Reader:
    def load(self, state, directory):
        if dist.get_rank() == 1:
            raise OSError("damaged share")
        return {"read": dist.get_rank()}

reader = _failing_together(Reader(), dist.group.WORLD, torch.device("cpu"))
try:
    outcome = f"loaded {reader.load({}, '/nowhere')}"
    exchange = [None, None]
    dist.all_gather_object(exchange, outcome)  # Megatron's exchange: rank 1 never comes
except PeerLoadError as exc:
    outcome = f"peer: {exc}"
except OSError as exc:
    outcome = f"own: {exc}"
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(outcome, f)
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_a_share_that_fails_on_one_rank_fails_on_all(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(SCRIPT)
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
           "TORCH_GLOO_TIMEOUT_SECONDS": "60"}
    try:
        done = subprocess.run(torchrun_cmd(2, str(script), str(tmp_path)), capture_output=True, text=True, env=env,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 went on into the exchange while rank 1 had failed: the load hung")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcomes = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert outcomes == {0: "peer: another data-parallel rank could not read its share of the checkpoint",
                        1: "own: damaged share"}, outcomes
