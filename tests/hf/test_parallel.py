"""TP=2 / PP=2 / EP=2 through a real 2-process torchrun (gloo): Megatron's logits, loaded straight from
the HF directory and from the converted TP=1 dist checkpoint (resharded on load), equal transformers'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

import hfutil  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "scripts" / "hf_parallel.py"
TOL = 1e-5

# (architecture, layout flags): Llama and Qwen3 (qk-norm) under TP=2, Llama and Qwen3-MoE under PP=2,
# Qwen3-MoE under EP=2. (MoE under TP needs sequence parallelism, which the CPU local spec lacks.)
CASES = [("llama31", ["--tp", "2"]), ("qwen3", ["--tp", "2"]), ("llama31", ["--pp", "2"]),
         ("qwen3_moe", ["--pp", "2"]), ("qwen3_moe", ["--ep", "2"])]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """HF dir, recipe and TP=1 checkpoint per architecture (converted in a subprocess, as a user would)."""
    root = tmp_path_factory.mktemp("hf_parallel")
    out = {}
    for arch in sorted({a for a, _ in CASES}):
        hf = hfutil.make_hf_model(arch, root / arch)
        recipe = hfutil.write_recipe(hf, root / f"{arch}.toml")
        ck = root / f"{arch}_ck"
        run = subprocess.run([sys.executable, "-c", "from recipec.compiler.cli import main; main()", "convert",
                              "hf-to-mcore", str(hf), "--recipe", str(recipe), "-o", str(ck)],
                             env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out[arch] = (hf, recipe, ck)
    return out


@pytest.mark.parametrize("arch, flags", CASES, ids=[f"{a}-{'='.join(f).lstrip('-')}" for a, f in CASES])
def test_layout_logits_match_transformers(converted, tmp_path: Path, arch: str, flags: list[str]) -> None:
    hf, recipe, ck = converted[arch]
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(hfutil.free_port()), str(SCRIPT), "--hf-dir", str(hf), "--recipe", str(recipe),
           "--ckpt", str(ck), "--out", str(out), *flags]
    proc = subprocess.run(cmd, env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    result = json.loads(out.read_text())
    assert result["hf_dir"] < TOL and result["ckpt"] < TOL, result
