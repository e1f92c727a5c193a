"""Context parallelism's batch split, on two gloo ranks: each rank gets its two load-balanced
chunks of every sequence (rank r of C: chunks r and 2C-1-r of 2C), tokens, labels, mask and
positions alike. CP attention itself needs Transformer Engine (GPU); this is the part recipec
owns, and the part megatron-core 0.19 broke (`is_hybrid_cp`, session 6 on two H200s)."""

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
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(context_parallel_size=2)
from recipec.runtime.data import _this_cp_rank
seq = torch.arange(16).reshape(1, 16)
batch = {"tokens": seq, "labels": seq + 100, "loss_mask": (seq % 3 > 0).float(), "position_ids": seq.clone()}
out = _this_cp_rank(batch)
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump({k: v.tolist() for k, v in out.items()}, f)
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_each_cp_rank_gets_its_two_balanced_chunks(tmp_path: Path) -> None:
    script = tmp_path / "cp_split.py"
    script.write_text(SCRIPT)
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(torchrun_cmd(2, str(script), str(tmp_path)), capture_output=True, text=True, env=env,
                          timeout=150, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    chunks = {0: [0, 1, 2, 3, 12, 13, 14, 15], 1: [4, 5, 6, 7, 8, 9, 10, 11]}
    for rank, positions in chunks.items():
        got = results[rank]
        assert got["tokens"] == [positions] and got["position_ids"] == [positions]
        assert got["labels"] == [[p + 100 for p in positions]]
        assert got["loss_mask"] == [[float(p % 3 > 0) for p in positions]]
