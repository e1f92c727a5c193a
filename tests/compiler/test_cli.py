"""The `recipec` command line: build (files and formats), explain, diff, schema, list."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from click.testing import CliRunner
from compiler_testlib import DATA, SMALL

from recipec.compiler import build
from recipec.compiler.cli import main
from recipec.compiler.loader import bundled_recipes
from recipec.compiler.structure import section_classes


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result


def test_build_writes_resolved_plan_and_launch_script(in_tmp: Path) -> None:
    result = run("build", str(SMALL), "train.train_iters=20")
    assert result.exit_code == 0, result.output
    out = in_tmp / "build" / "small"
    assert sorted(p.name for p in out.iterdir()) == ["launch.sh", "plan.json", "resolved.toml"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["train"]["train_iters"] == 20
    assert plan["plan"]["world_size"] == 2
    assert plan["fingerprint"].startswith("sha256:")
    assert tomllib.loads((out / "resolved.toml").read_text())["train"]["train_iters"] == 20
    script = (out / "launch.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "torchrun" in script and plan["fingerprint"] in script
    assert (out / "launch.sh").stat().st_mode & 0o111
    assert "small: " in result.output and "TP 1 x PP 1 x CP 1 x DP 2" in result.output
    assert "wrote    build/small/resolved.toml" in result.output


def test_build_out_dir(in_tmp: Path) -> None:
    result = run("build", str(SMALL), "-o", "elsewhere/x")
    assert result.exit_code == 0, result.output
    assert (in_tmp / "elsewhere/x/plan.json").exists()
    assert json.loads((in_tmp / "elsewhere/x/plan.json").read_text())["plan"]["node_commands"][0][-1] == "elsewhere/x"


def test_build_format_toml_and_json(in_tmp: Path) -> None:
    compiled = build(SMALL)
    toml_out = run("build", str(SMALL), "--format", "toml")
    assert toml_out.exit_code == 0 and toml_out.output == compiled.to_toml()
    tomllib.loads(toml_out.output)  # the resolved recipe is valid TOML
    json_out = run("build", str(SMALL), "--format", "json")
    assert json_out.exit_code == 0 and json_out.output == compiled.to_json()
    data = json.loads(json_out.output)
    assert set(data) == {"artifact_version", "config", "fingerprint", "plan", "warnings"}
    assert set(data["config"]) >= set(section_classes())
    bad = run("build", str(SMALL), "--format", "yaml")
    assert bad.exit_code == 2 and "Invalid value for '--format'" in bad.output


def test_build_prints_warnings_to_stderr(in_tmp: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(SMALL), "scheduler.lr_decay_iters=100"])
    assert result.exit_code == 0
    assert "recipec: warning: lr_decay_iters 100 > train_iters 50" in result.output


def test_explain(in_tmp: Path) -> None:
    result = run("explain", str(SMALL), "train.micro_batch_size")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "train.micro_batch_size = 2",
        "  set by:  tests/compiler/data/small.toml:16",
        "  default: 1",
        "  help:    Sequences per forward pass on one rank.",
    ]
    unknown = run("explain", str(SMALL), "model.num_layrs")
    assert unknown.exit_code == 2 and "no key `model.num_layrs`" in unknown.output


def test_diff(in_tmp: Path) -> None:
    result = run("diff", str(SMALL), str(DATA / "dense.toml"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split() == ["model.num_layers", "4", "->", "24"] for line in lines)
    assert any(line.split()[0] == "model.hidden_size" and "128" in line and "2048" in line for line in lines)
    assert not any(line.split()[0] == "name" for line in lines)
    same = run("diff", str(SMALL), str(SMALL))
    assert same.exit_code == 0 and same.output == "no differences\n"
    missing = run("diff", str(SMALL), "nope_recipe")
    assert missing.exit_code == 2 and "recipe 'nope_recipe' not found" in missing.output


def test_schema_is_json_with_every_section() -> None:
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    props = schema["properties"]
    assert set(section_classes()) <= set(props)
    assert {"extends", "name", "description"} <= set(props)
    assert props["model"]["properties"]["num_layers"]["type"] == "integer"
    assert props["model"]["properties"]["normalization"]["enum"] == ["RMSNorm", "LayerNorm"]
    assert props["launch"]["properties"]["env"]["type"] == "object"
    assert schema["additionalProperties"] is False


def test_list_shows_every_bundled_recipe() -> None:
    result = run("list")
    assert result.exit_code == 0, result.output
    assert "(broken)" not in result.output
    for path in bundled_recipes():
        assert path.stem in result.output


def test_help_and_version() -> None:
    assert run("--help").exit_code == 0
    assert run("build", "--help").exit_code == 0
    assert run("--version").exit_code == 0


def test_no_arguments_is_a_usage_error() -> None:
    result = run("build")
    assert result.exit_code == 2 and "Missing argument 'RECIPE'" in result.output


def test_build_writes_the_sbatch_script_for_slurm_recipes_only(in_tmp: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["build", "llama3_8b", "launch.executor=slurm", "-o", "out"]).exit_code == 0
    script = (in_tmp / "out" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "#SBATCH --signal=B:USR1@" in script
    assert runner.invoke(main, ["build", "llama3_8b", "-o", "out"]).exit_code == 0
    assert not (in_tmp / "out" / "job.sbatch").exists()


def test_a_reader_that_stops_early_is_not_an_error(in_tmp: Path) -> None:
    """`recipec diff A B | head -1`: the closed pipe ends the command quietly with exit 0."""
    import subprocess
    import sys

    script = (f"{sys.executable} -m recipec.compiler.cli diff llama3_8b llama3_tiny | head -1; "
              "exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.count("\n") == 1
