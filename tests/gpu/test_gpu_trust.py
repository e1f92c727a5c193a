"""GPU checks of the trust rules where only a GPU exercises them: Transformer Engine's pickled FP8
`_extra_state` goes through the allowlisting unpickler (a real FP8 state loads, a crafted one is
refused before it runs), and an FP8 run with TE saves hashed checkpoints that a relaunch verifies
and resumes from with the same losses. Run on the GPU machine (`pytest tests/gpu`), skipped elsewhere."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from gpu_launch import require_cuda_and_te, train_one_rank

te = require_cuda_and_te()
import torch
from recipec.compiler import build
from recipec.runtime import safe_load


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_te_fp8_extra_state_round_trips_and_a_crafted_one_is_refused(tmp_path: Path) -> None:
    from transformer_engine.common.recipe import DelayedScaling

    guarded = safe_load.guard_te_extra_state()
    assert "transformer_engine.pytorch.module.base" in guarded, guarded
    assert os.environ.get(safe_load.TE_PICKLE_OPT_IN) == "1"  # TE 2.20 refuses pickled state without it
    source = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
    with te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
        source(torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)).sum().backward()
    state = source.get_extra_state()
    assert isinstance(state, torch.Tensor) and state.numel() > 0, "TE >= 2.0 keeps FP8 state as pickled bytes"
    target = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
    target.set_extra_state(state)  # through the allowlisting unpickler
    assert torch.equal(target.fp8_meta["scaling_fwd"].amax_history, source.fp8_meta["scaling_fwd"].amax_history)

    sentinel = tmp_path / "SENTINEL"
    crafted = torch.frombuffer(bytearray(pickle.dumps({"recipe": Payload(sentinel)})), dtype=torch.uint8)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        te.Linear(64, 64, params_dtype=torch.bfloat16).cuda().set_extra_state(crafted)
    assert not sentinel.exists()


def _run(tmp: Path, name: str, iters: int, out: Path) -> tuple[str, dict[int, float]]:
    compiled = build("llama3_tiny", [
        'launch.accelerator="H100-80GB"', 'precision.dtype="bf16"', 'precision.fp8="delayed"',
        "launch.gpus_per_node=1", f"train.train_iters={iters}", "logging.log_interval=1",
        "checkpoint.save_interval=12", "~train.eval_interval",
        # the LR schedule of the whole 24-step run, so the 12-step first half follows it exactly
        "scheduler.lr_decay_iters=24", "scheduler.lr_warmup_iters=2", f"launch.output_dir={json.dumps(str(out))}",
        f"checkpoint.save={json.dumps(str(out / 'checkpoints'))}"])
    return train_one_rank(compiled.write(tmp / f"{name}.build"), out)


def test_fp8_checkpoints_are_hashed_verified_and_resume_like_an_uninterrupted_run(tmp_path: Path) -> None:
    _, straight = _run(tmp_path, "straight", 24, tmp_path / "straight")
    _, first = _run(tmp_path, "first", 12, tmp_path / "split")
    manifest = json.loads((tmp_path / "split" / "checkpoints" / "iter_0000012" / "recipec_manifest.json").read_text())
    assert manifest["files"] and all("sha256" in json.dumps(entry) for entry in manifest["files"].values())
    log, second = _run(tmp_path, "second", 24, tmp_path / "split")
    assert "resumed from" in log and "at step 12" in log, log[-4000:]
    assert all(abs(first[s] - straight[s]) < 1e-3 for s in range(1, 13)), (first, straight)
    diffs = {s: abs(second[s] - straight[s]) for s in range(13, 25)}
    assert max(diffs.values()) < 0.02, diffs
