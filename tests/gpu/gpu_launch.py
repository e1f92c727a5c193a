"""What the GPU tests share: the skip where there is no GPU or TE, and one GPU rank of a compiled
recipe through torchrun (its log and its losses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import torchrun_cmd  # the tests' one torchrun helper


def require_cuda_and_te() -> ModuleType:
    """Skip the calling test module unless a CUDA GPU and Transformer Engine are here; TE's torch API."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    try:
        import transformer_engine.pytorch as te
    except Exception:  # noqa: BLE001 - a TE that does not import, for whatever reason, means no TE tests
        pytest.skip("needs Transformer Engine", allow_module_level=True)
    return te


def train_one_rank(artifact: Path, out: Path) -> tuple[str, dict[int, float]]:
    """Run `artifact` on one GPU (standalone rendezvous on a free port); the log and step -> loss."""
    proc = subprocess.run(torchrun_cmd(1, "-m", "recipec.runtime.train", "--artifact", str(artifact)),
                          check=False, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return log, {r["step"]: r["loss"] for r in rows if "loss" in r}
