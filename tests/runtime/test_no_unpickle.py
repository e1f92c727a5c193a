"""Loaders never unpickle (issue 11): a checkpoint whose common.pt or DCP .metadata holds a pickle
that runs code (here: `touch SENTINEL`) is refused by the runtime, even with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment (which a recipe's launch.env could set);
the sentinel is never created and the run ends without a traceback."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
import torch
from recipec.compiler import build
from recipec.runtime import safe_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import free_tcp_port  # noqa: E402


class Payload:
    """Pickles as `os.system("touch <sentinel>")`: what a crafted checkpoint file would carry."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_forced_weights_only_refuses_code_even_where_the_caller_asks_for_full_unpickling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "SENTINEL"
    torch.save({"weights": torch.ones(2), "payload": Payload(sentinel)}, tmp_path / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv(safe_load.FORCE, "0")  # (so that monkeypatch restores it, whatever enforce sets)
    safe_load.enforce_weights_only()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ and os.environ[safe_load.FORCE] == "1"
    # torch DCP passes weights_only=False for byte items; Megatron passes nothing for common.pt.
    for kwargs in ({}, {"weights_only": False}):
        with pytest.raises(pickle.UnpicklingError) as info:
            torch.load(tmp_path / "common.pt", **kwargs)
        assert "posix.system" in safe_load.refusal(info.value)
    assert not sentinel.exists()
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["weights"], torch.ones(2))


def test_dcp_metadata_is_read_data_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    monkeypatch.setattr(filesystem, "pickle", filesystem.pickle)  # restored after the test
    assert safe_load.guard_dcp_metadata() and filesystem.pickle.load is safe_load.data_only_load
    assert safe_load.guard_dcp_metadata()  # idempotent
    real = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.bfloat16), torch.Size([4, 2]),
        [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2]))])},
        storage_data={MetadataIndex("w", torch.Size([0, 0]), 0): filesystem._StorageInfo("__0_0.distcp", 0, 32)})
    loaded = safe_load.data_only_loads(pickle.dumps(real))
    assert loaded.state_dict_metadata == real.state_dict_metadata and loaded.storage_data == real.storage_data
    sentinel = tmp_path / "SENTINEL"
    for payload in (Payload(sentinel), {"x": Payload(sentinel)}, [real, Payload(sentinel)]):
        with pytest.raises(pickle.UnpicklingError, match=r"refers to posix\.system.*refusing to unpickle"):
            filesystem.pickle.load(io.BytesIO(pickle.dumps(payload)))
    # Names that live in an allowed module but are not its data classes: module attributes, dotted names.
    for module, name in (("torch.distributed.checkpoint.filesystem", "pickle"), ("torch", "load"),
                         ("torch.distributed.checkpoint.filesystem", "os.system")):
        assert safe_load._allowed(module, name) is None
    assert not sentinel.exists()


def _poison(step_dir: Path, file: str, payload: Payload) -> None:
    """Replace `file` with a code-running pickle and rewrite the manifest to match, as the author of
    a handed-over checkpoint would: only the loaders stand between it and the run."""
    path = step_dir / file
    if file == "common.pt":
        state = torch.load(path, weights_only=True)
        state["payload"] = payload
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    manifest = step_dir / "recipec_manifest.json"
    meta = json.loads(manifest.read_text())
    for name, entry in meta["files"].items():
        data = (step_dir / name).read_bytes()
        meta["files"][name] = ({**entry, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                               if isinstance(entry, dict) else len(data))
    manifest.write_text(json.dumps(meta))


@pytest.mark.timeout(600)
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    """Two checkpoints, the newest with a crafted .metadata, the older with a crafted common.pt; the
    resume runs with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1. Neither payload runs; the run reports both
    checkpoints and exits 2 (there is nothing good to fall back to), without a traceback."""
    ckpt = tmp_path / "ckpt"
    common = ["checkpoint.save_interval=2", f"launch.output_dir={tmp_path / 'out'}", f"checkpoint.save={ckpt}",
              "train.eval_interval=100", "scheduler.lr_decay_iters=10"]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run(iters: int, **extra: str) -> subprocess.CompletedProcess[str]:
        directory = build("llama3_tiny", [f"train.train_iters={iters}", *common]).write(tmp_path / f"b{iters}")
        return subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                              check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**env, "MASTER_PORT": str(free_tcp_port()), **extra})

    first = run(4)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    sentinels = [tmp_path / "SENTINEL_metadata", tmp_path / "SENTINEL_common"]
    _poison(ckpt / "iter_0000004", ".metadata", Payload(sentinels[0]))
    _poison(ckpt / "iter_0000002", "common.pt", Payload(sentinels[1]))
    shutil.rmtree(tmp_path / "out")

    second = run(6, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    output = second.stdout + second.stderr
    assert not any(s.exists() for s in sentinels), "a checkpoint's pickle ran code"
    assert "Traceback" not in output, output[-4000:]
    assert second.returncode == 2, output[-4000:]
    assert "refers to posix.system" in output  # the .metadata refusal, named
    assert "iter_0000002" in output and "iter_0000004" in output


@dataclasses.dataclass
class FakeRecipe:
    """Stands in for transformer_engine.common.recipe.DelayedScaling (TE is not installed on CPU)."""

    margin: int = 0
    amax_history_len: int = 1024


class FakeFormatHelper(typing.NamedTuple):
    """Stands in for transformer_engine.common.recipe._FormatHelper (held by its Format enum)."""

    max_fwd: float
    max_bwd: float


def test_te_extra_state_loads_fp8_state_and_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What TE >= 2.0 pickles into `_extra_state` (recipe, scales, amax history) loads; a crafted
    pickle in the same place is refused before it runs."""
    monkeypatch.setattr(safe_load, "_TE_RECIPE_MODULES", (__name__,))
    state = {"recipe": FakeRecipe(margin=2), "format": FakeFormatHelper(448.0, 57344.0), "scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
             "extra_fp8_variables": {"num_gemms": 1, "global_fp8_buffer_pos_fwd": None},
             "weight": torch.nn.Parameter(torch.randn(2, 2))}
    loaded = safe_load.extra_state_loads(pickle.dumps(state))
    assert loaded["recipe"] == FakeRecipe(margin=2) and loaded["format"] == FakeFormatHelper(448.0, 57344.0)
    assert torch.equal(loaded["scale_fwd"], state["scale_fwd"]) and torch.equal(loaded["weight"], state["weight"])
    assert loaded["extra_fp8_variables"] == state["extra_fp8_variables"]
    sentinel = tmp_path / "SENTINEL"
    for crafted in ({"recipe": Payload(sentinel)}, {"scale_fwd": torch.ones(1), "x": [Payload(sentinel)]}):
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            safe_load.extra_state_loads(pickle.dumps(crafted))
    assert not sentinel.exists()


def test_te_extra_state_guard_swaps_the_modules_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where TE imports, its module's `pickle.loads` becomes the allowlisted one (GPU machine);
    without TE nothing is touched."""
    import importlib.util

    guarded = safe_load.guard_te_extra_state()
    if importlib.util.find_spec("transformer_engine") is None:
        assert guarded == []
        return
    import transformer_engine.pytorch.module.base as te_base

    assert "transformer_engine.pytorch.module.base" in guarded
    assert te_base.pickle.loads is safe_load.extra_state_loads
    assert te_base.pickle.dumps is pickle.dumps
