"""Golden job scripts and per-node torchrun commands for llama3_8b on 2 and 128 nodes.

Regenerate after an intended change: RECIPEC_UPDATE_GOLDEN=1 python -m pytest tests/launch -k golden
The interpreter path and the fingerprint are normalized, so the files do not depend on the
machine or on unrelated schema changes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from recipec.compiler import build
from recipec.compiler.executors.node import launch_sh, node_argv
from recipec.compiler.executors.slurm import sbatch_script
from recipec.compiler.launcher import flag_overrides
from recipec.compiler.shell import join

GOLDEN = Path(__file__).parent / "golden"
PYTHON = "/opt/venv/bin/python"


def _normalize(text: str) -> str:
    return re.sub(r"sha256:[0-9a-f]{64}", "sha256:<fingerprint>", text)


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    text = _normalize(text)
    if os.environ.get("RECIPEC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"missing golden {path}; run with RECIPEC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed; if intended, regenerate with RECIPEC_UPDATE_GOLDEN=1"


def _compiled(nodes: int, executor: str):
    return build("llama3_8b", flag_overrides(nodes=str(nodes), executor=executor, master="node0001:29500"))


@pytest.mark.parametrize("nodes", [2, 128])
def test_golden_sbatch(nodes: int) -> None:
    compiled = _compiled(nodes, "slurm")
    script = sbatch_script(compiled, python=PYTHON)
    _check(f"llama3_8b_nodes{nodes}.sbatch", script)
    assert f"#SBATCH --nodes={nodes}" in script
    assert "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    assert '--rdzv-id="$SLURM_JOB_ID"' in script and '--nnodes="$SLURM_NNODES"' in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script


@pytest.mark.parametrize("nodes", [2, 128])
def test_golden_torchrun_commands(nodes: int) -> None:
    compiled = _compiled(nodes, "local")
    ranks = range(nodes) if nodes <= 2 else (0, 1, nodes - 1)
    text = "".join(f"# node {k}\n{join(node_argv(compiled, k, python=PYTHON))}\n" for k in ranks)
    _check(f"llama3_8b_nodes{nodes}.torchrun.txt", text)
    assert f"--nnodes={nodes} --nproc-per-node=8 --node-rank={nodes - 1}" in text
    assert "--rdzv-endpoint=node0001:29500" in text
    assert f"{PYTHON} -m torch.distributed.run" in text


def test_golden_launch_sh() -> None:
    script = launch_sh(_compiled(2, "local"))
    _check("llama3_8b_nodes2.launch.sh", script)
    assert 'exec python -m recipec.compiler.supervisor -- torchrun --nnodes=2' in script
    assert '--node-rank="$NODE_RANK"' in script


def test_plan_world_size_matches_nodes() -> None:
    assert _compiled(128, "slurm").plan.world_size == 1024


def test_every_bundled_recipes_scripts_are_valid_bash(tmp_path: Path) -> None:
    """`bash -n` on launch.sh and job.sbatch of every bundled recipe (nsys and a container image too)."""
    import subprocess

    from recipec.compiler.loader import bundled_recipes

    for path in bundled_recipes():
        compiled = build(path, ["launch.executor=slurm", "profiling.use_nsys=true", "launch.container_image=img"])
        for text in (launch_sh(compiled, PYTHON), sbatch_script(compiled, PYTHON), sbatch_script(compiled)):
            script = tmp_path / "script.sh"
            script.write_text(text)
            proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
            assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
