"""The portable optimizer state on one data-parallel rank (runtime/optimizer_gather.py) is Megatron's,
bit for bit: the same dict of tensors from get_parameter_state_dp_zero, with several buckets (so
the buffer offsets matter), a plain run's single bucket, and a random Adam state; and a final
fully_reshardable save through it resumes (tests/runtime/test_train_e2e.py and test_async_save.py
resume final checkpoints written this way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, recipec_cmd, torchrun_cmd

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from recipec.runtime import train
from recipec.runtime.adam_state import prime_optimizer_state_for_load
from recipec.runtime.artifact import load_artifact
from recipec.runtime.device import activate_cpu_mode
from recipec.runtime.model import build_model_chunks
from recipec.runtime import optimizer_gather

activate_cpu_mode()
artifact = load_artifact(sys.argv[1])
c = artifact.config
train._init_distributed(c, False)
chunks, _ = build_model_chunks(c, artifact.plan.padded_vocab_size, on_gpu=False)
bucket_size = int(sys.argv[2]) or None
ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, bucket_size=bucket_size,
                                           overlap_grad_reduce=bucket_size is not None)
ddp = [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m) for m in chunks]
optimizer, _ = train._optimizer(c, ddp)
prime_optimizer_state_for_load(optimizer)
generator = torch.Generator().manual_seed(0)
for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator))
            for key in ("exp_avg", "exp_avg_sq"):
                opt.optimizer.state[p][key].copy_(torch.rand(p.shape, generator=generator))
megatron = DistributedOptimizer.get_parameter_state_dp_zero
assert optimizer_gather.install()
ours = DistributedOptimizer.get_parameter_state_dp_zero
assert ours is not megatron

def same(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where

buckets = 0
for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
    buckets += sum(len(b.buckets) for b in opt.buffers)
    for gloo in (False, True):
        same(megatron(opt, use_gloo_comm=gloo, return_on_all_ranks=True),
             ours(opt, use_gloo_comm=gloo, return_on_all_ranks=True), f"state(gloo={gloo})")
print("IDENTICAL buckets", buckets, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bucket_size", [0, 20_000], ids=["one-bucket", "several-buckets"])
def test_single_rank_state_equals_megatrons(tmp_path: Path, bucket_size: int) -> None:
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    built = subprocess.run(recipec_cmd("build", "llama3_tiny", "launch.gpus_per_node=1", "-o", str(tmp_path / "build")),
                           capture_output=True, text=True, env=env, timeout=120, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    script = tmp_path / "gather.py"
    script.write_text(SCRIPT)
    done = subprocess.run(torchrun_cmd(1, str(script), str(tmp_path / "build"), str(bucket_size)),
                          capture_output=True, text=True, env=env, timeout=240, check=False)
    lines = [line for line in done.stdout.splitlines() if "IDENTICAL buckets" in line]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-4000:]
    buckets = int(lines[0].rsplit(" ", 1)[1])
    assert (buckets > 1) == bool(bucket_size), lines[0]
