"""Real Megatron-Core on CPU/gloo through `recipec launch`: the one property the runtime's other
end-to-end tests do not already prove.

This file used to drive a hand-written training loop (scripts/mcore_tiny.py) and re-prove what
the runtime proves: TP/PP/DP equivalence, resume, a TP=2 checkpoint continued under TP=1
(tests/runtime/test_train_e2e.py), a DP=2 checkpoint resumed under DP=1 (test_async_save.py),
local modules + SDPA on CPU (test_train_e2e.py's reference run). Left here: a run with the plain
optimizer (Megatron's FP32Optimizer, `optimizer.use_distributed_optimizer = false`; every other
runtime test uses the distributed one) resumes with the losses of the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, recipec_cmd

TOL = 1e-5
# lr_decay_iters fixed: the schedule does not depend on a run's own train_iters.
PLAIN = ["optimizer.use_distributed_optimizer=false", "scheduler.lr_decay_iters=10", "logging.log_interval=1",
         "train.eval_interval=1000", "checkpoint.save_interval=3", "checkpoint.keep_last=2", "launch.gpus_per_node=1"]


def _launch(directory: Path, *overrides: str) -> tuple[dict[int, float], str]:
    """`recipec launch llama3_tiny` in `directory` (its own runs/ and build/); (step -> loss, output)."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(recipec_cmd("launch", "llama3_tiny", *PLAIN, *overrides, "-o", "build"), cwd=directory,
                          env={**clean_env(), "CUDA_VISIBLE_DEVICES": ""}, check=False, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    metrics = directory / "runs" / "llama3_tiny" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, output


def test_plain_optimizer_resumes_with_the_uninterrupted_losses(tmp_path: Path) -> None:
    reference, _ = _launch(tmp_path / "reference", "train.train_iters=6")
    assert sorted(reference) == list(range(1, 7))
    # Step 3's checkpoint, alone in a root of its own: what a run stopped after step 3 leaves.
    saved = tmp_path / "reference" / "runs" / "llama3_tiny" / "checkpoints"
    stopped = tmp_path / "stopped"
    shutil.copytree(saved / "iter_0000003", stopped / "iter_0000003")
    (stopped / "latest").write_text("3\n")
    resumed, output = _launch(tmp_path / "resumed", "train.train_iters=6", f"checkpoint.load={stopped}")
    assert "resumed from" in output and "at step 3" in output, output[-3000:]
    assert sorted(resumed) == [4, 5, 6], resumed
    diffs = {s: abs(resumed[s] - reference[s]) for s in resumed}
    assert max(diffs.values()) <= TOL, f"resumed from step 3 with the plain optimizer: |diff| per step {diffs}"
