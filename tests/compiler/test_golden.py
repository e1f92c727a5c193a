"""Golden resolved output of a small recipe, and byte-identical, reproducible builds.

Regenerate the golden files after an intended change with

    RECIPEC_UPDATE_GOLDEN=1 python -m pytest -q tests/compiler/test_golden.py

and review the diff (it shows every resolved value and its provenance that moved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from compiler_testlib import REPO, SMALL

from recipec.compiler import build
from recipec.compiler.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("RECIPEC_UPDATE_GOLDEN") == "1"
ARTIFACT = "build/golden_small"


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"{path} is missing: run with RECIPEC_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text()
    assert actual == expected, (
        f"{name} differs from the golden file; if the change is intended, regenerate with "
        f"RECIPEC_UPDATE_GOLDEN=1 python -m pytest -q {Path(__file__).relative_to(REPO)} and review the diff"
    )


def plan_json(compiled) -> str:
    return json.dumps(json.loads(compiled.to_json())["plan"], indent=2, sort_keys=True) + "\n"


def test_resolved_toml_matches_golden(in_repo: Path) -> None:
    compiled = build(SMALL, artifact_dir=ARTIFACT)
    check_golden("small.resolved.toml", compiled.to_toml())


def test_plan_matches_golden(in_repo: Path) -> None:
    compiled = build(SMALL, artifact_dir=ARTIFACT)
    check_golden("small.plan.json", plan_json(compiled))


def test_golden_shows_every_layer_of_provenance(in_repo: Path) -> None:
    text = build(SMALL, artifact_dir=ARTIFACT).to_toml()
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line and not line.startswith("#")}
    assert lines["rotary_base"].endswith("# recipes_toml/_base/llama3.toml:" + lines["rotary_base"].rsplit(":", 1)[1])
    assert "tests/compiler/data/mixins/cpu_short.toml:3" in lines["train_iters"]
    assert "tests/compiler/data/small.toml:15" in lines["global_batch_size"]
    assert "overridden by tests/compiler/data/small.toml" in lines["vocab_size"]  # set by the base, then here
    assert lines["kv_channels"] == "kv_channels = 32  # derived: hidden_size / num_attention_heads"
    assert lines["micro_batch_size"].startswith("micro_batch_size = 2")
    assert lines["seed"].endswith("# default")
    assert 'name = "small"  # derived: recipe file name' in text


def test_two_builds_are_byte_identical(in_repo: Path) -> None:
    a, b = build(SMALL, artifact_dir=ARTIFACT), build(SMALL, artifact_dir=ARTIFACT)
    assert a.to_toml() == b.to_toml()
    assert a.to_json() == b.to_json()
    assert a.fingerprint == b.fingerprint


def test_cli_build_dirs_are_byte_identical(tmp_path: Path, monkeypatch) -> None:
    outputs = []
    for run in ("first", "second"):
        work = tmp_path / run
        work.mkdir()
        monkeypatch.chdir(work)
        result = CliRunner().invoke(main, ["build", str(SMALL)])
        assert result.exit_code == 0, result.output
        outputs.append({p.name: p.read_bytes() for p in sorted((work / "build" / "small").iterdir())})
    assert sorted(outputs[0]) == ["launch.sh", "plan.json", "resolved.toml"]
    assert outputs[0] == outputs[1]


def test_cli_subprocess_builds_are_byte_identical(tmp_path: Path) -> None:
    """Two cold interpreters (hash seeds differ) write the same bytes."""
    outs = []
    for i, seed in enumerate(("1", "2")):
        out = tmp_path / f"out{i}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "build", str(SMALL), "-o", "out"],
                       cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
        (tmp_path / "out").rename(out)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]


def test_building_resolved_toml_reproduces_config_and_fingerprint(in_repo: Path, tmp_path: Path) -> None:
    for recipe in (SMALL, "llama3_tiny", "llama3_8b"):
        first = build(recipe, artifact_dir=ARTIFACT)
        resolved = tmp_path / f"{first.name}.toml"
        resolved.write_text(first.to_toml())
        again = build(resolved, artifact_dir=ARTIFACT)
        assert again.config == first.config, recipe
        assert again.plan == first.plan, recipe
        assert again.fingerprint == first.fingerprint, recipe
        # and once more: resolving a resolved recipe is a fixed point
        resolved.write_text(again.to_toml())
        assert build(resolved, artifact_dir=ARTIFACT).fingerprint == first.fingerprint


def test_plan_json_in_build_dir_is_to_json(in_tmp: Path) -> None:
    compiled = build(SMALL)
    directory = compiled.write()
    assert (directory / "plan.json").read_text() == compiled.to_json()
    assert (directory / "resolved.toml").read_text() == compiled.to_toml()
    assert json.loads(compiled.to_json())["fingerprint"] == compiled.fingerprint
