"""`recipec convert verify` (runtime/hf/verify.py) on a tiny random Llama: a fresh conversion passes with
logits equal to transformers' to < 1e-5, a checkpoint converted from weights with one tensor altered fails
(exit 1, the difference printed), and user mistakes are one message and exit 2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil


def _diff(out: str) -> float:
    found = re.search(r"max \|diff\|:\s+(\S+)", out)
    assert found, out
    return float(found.group(1))


def _alter_one_tensor(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from recipec.runtime.hf.cli import main as convert
    from recipec.runtime.hf.verify import main as verify
    from recipec.runtime.safe_load import FORCE

    monkeypatch.delenv(FORCE, raising=False)  # the entry points set it for the process; put it back after
    hf = hfutil.make_hf_model("llama2", tmp_path / "hf")
    recipe = str(hfutil.write_recipe(hf, tmp_path / "l.toml"))
    assert convert(["hf-to-mcore", str(hf), "--recipe", recipe, "-o", str(tmp_path / "ck")]) == 0

    # As a user runs it (`recipec convert verify`): its own process, exit 0, the block on stdout.
    run = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "convert", "verify", str(tmp_path / "ck"), str(hf),
                          "--recipe", recipe, "--seq", "24", "--batch", "3"],
                         check=False, env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "PASS" in run.stdout and "3 x 24 random ids" in run.stdout and "100.00%" in run.stdout
    assert _diff(run.stdout) < 1e-5

    # One weight altered before conversion: the checkpoint no longer computes what HF_DIR does.
    _alter_one_tensor(hf, tmp_path / "hf_alt")
    assert convert(["hf-to-mcore", str(tmp_path / "hf_alt"), "--recipe", recipe, "-o", str(tmp_path / "ck_alt")]) == 0
    capsys.readouterr()
    assert verify([str(tmp_path / "ck_alt"), str(hf), "--recipe", recipe]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and 1e-4 < _diff(out) < 1.0
    # ... and a looser --atol accepts the same difference.
    assert verify([str(tmp_path / "ck_alt"), str(hf), "--recipe", recipe, "--atol", "1.0"]) == 0

    # User mistakes: one `recipec: error:` message, exit 2, no traceback.
    qwen = hfutil.make_hf_model("qwen3", tmp_path / "qwen")
    small = hfutil.make_hf_model("llama2", tmp_path / "small", hidden_size=32, intermediate_size=48)
    small_recipe = str(hfutil.write_recipe(small, tmp_path / "s.toml"))
    shutil.copytree(tmp_path / "ck", tmp_path / "ck_bad")
    shard = max((tmp_path / "ck_bad").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: the manifest's size tells
    cases = {
        "another architecture": ([str(tmp_path / "ck"), str(qwen), "--recipe", recipe],
                                 "does not match the recipe"),
        "checkpoint of another shape": ([str(tmp_path / "ck"), str(small), "--recipe", small_recipe],
                                        "does not hold the recipe's model"),
        "not a checkpoint": ([str(hf), str(hf), "--recipe", recipe], "no recipec/Megatron dist checkpoint"),
        "missing dir": ([str(tmp_path / "nope"), str(hf), "--recipe", recipe], "no such directory"),
        "arguments swapped": ([str(hf), str(tmp_path / "ck"), "--recipe", recipe],
                              "not a Hugging Face model directory"),
        "damaged checkpoint": ([str(tmp_path / "ck_bad"), str(hf), "--recipe", recipe], "is damaged"),
        "under torchrun": ([str(tmp_path / "ck"), str(hf), "--recipe", recipe, "WORLD_SIZE"],
                           "start it without torchrun"),
    }
    for case, (argv, message) in cases.items():
        capsys.readouterr()
        if argv[-1] == "WORLD_SIZE":  # as torchrun would start it, two ranks
            argv = argv[:-1]
            monkeypatch.setenv("WORLD_SIZE", "2")
        assert verify(argv) == 2, case
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        err = capsys.readouterr().err
        assert err.count("recipec: error:") == 1 and message in err and "Traceback" not in err, (case, err)
