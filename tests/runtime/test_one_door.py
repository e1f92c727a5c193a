"""The door between compiler and runtime (design.md; issue 12): the runtime reads the compiler's
own typed Plan through runtime/artifact.py, the batch split is computed once (compiler/plan.py
batch_layout) and the runtime refuses a world the plan was not made for, the runtime never calls
`compiler.api.build`, and `convert hf-to-mcore` saves through runtime/checkpoint.save (hashed
manifest with the model record, like a trained checkpoint)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipec.compiler import ArtifactError, build
from recipec.compiler.plan import Plan, batch_layout
from recipec.compiler.render import fingerprint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("llama3_tiny").write(tmp_path_factory.mktemp("door") / "build")


def test_the_runtime_reads_the_compilers_typed_plan(artifact: Path, tmp_path: Path) -> None:
    from recipec.runtime.artifact import load_artifact

    loaded = load_artifact(artifact)
    assert isinstance(loaded.plan, Plan) and loaded.plan == build("llama3_tiny").plan
    assert loaded.plan.microbatches_per_step == batch_layout(loaded.config).microbatches_per_step
    data = json.loads((artifact / "plan.json").read_text())
    data["plan"]["surprise"] = 1  # a field this recipec never writes, fingerprint made to match
    data["fingerprint"] = fingerprint(data["config"], data["plan"])
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="plan has field.s. surprise this recipec does not write"):
        load_artifact(tmp_path)


def test_batch_layout_splits_every_step_over_the_data_parallel_ranks() -> None:
    c = build("llama3_tiny", ["launch.gpus_per_node=2", "train.global_batch_size=8", "train.micro_batch_size=2"]).config
    layout = batch_layout(c)
    assert (layout.world_size, layout.data_parallel_size, layout.microbatches_per_step) == (2, 2, 2)
    assert layout.rank_samples(3, 0) == range(24, 28) and layout.rank_samples(3, 1) == range(28, 32)
    tp2 = batch_layout(build("llama3_tiny", ["launch.gpus_per_node=2", "train.global_batch_size=8",
                                             "train.micro_batch_size=2", "parallel.tensor_model_parallel_size=2"]).config)
    assert (tp2.data_parallel_size, tp2.microbatches_per_step, tp2.rank_samples(1, 0)) == (1, 4, range(8, 16))


def test_a_world_the_plan_was_not_made_for_is_refused(artifact: Path, tmp_path: Path) -> None:
    """Was: a plan for 1 rank started on 2 split the batch by the live DP size and the
    microbatches by the plan's, silently training on another batch than the recipe's."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(artifact)], cwd=tmp_path,
                          env=env, check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "was compiled for 1 rank(s)" in proc.stderr and "torchrun started 2" in proc.stderr, proc.stderr[-3000:]


def test_the_runtime_never_compiles_a_recipe() -> None:
    """No module under runtime/ imports compiler.api's build (the CLI hands the convert commands
    compiler.api.compile_for_hf; Python callers reach it through convert.compile_recipe)."""
    offenders = []
    for path in sorted((REPO / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and (node.module or "").endswith("compiler.api")
                    and any(alias.name == "build" for alias in node.names)):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_hf_to_mcore_saves_a_hashed_checkpoint_with_the_model_record(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "tests" / "hf"))
    import hfutil
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import hf_to_mcore

    hf = hfutil.make_hf_model("llama2", tmp_path / "hf")
    step_dir = hf_to_mcore(hf, tmp_path / "ck", recipe=str(hfutil.write_recipe(hf, tmp_path / "r.toml")))
    meta = json.loads((step_dir / ckpt.MANIFEST).read_text())
    assert meta["hash"] == "sha256" and meta["files"]
    assert all(len(entry["sha256"]) == 64 and entry["size"] >= 0 for entry in meta["files"].values())
    assert meta["model"]["hidden_size"] == 64 and meta["padded_vocab_size"] >= 256
    assert meta["converted_from"] == str(hf.resolve()) and meta["layout"]["source"] == "weights"
    assert ckpt.verify(step_dir) is None
    victim = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    assert "corrupted in place" in (ckpt.verify(step_dir) or "")
