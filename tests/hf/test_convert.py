"""HF -> Megatron dist checkpoint -> HF for every architecture, in this process (single-rank gloo, TP=PP=1):
Megatron's logits equal transformers' (loaded from the checkpoint and straight from the HF directory),
the round trip is bit exact, and transformers loads what mcore-to-hf writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil  # noqa: E402
from hfutil import ARCHS  # noqa: E402

TOL = 1e-5



def _tensors(directory: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_bit_exact_round_trip(tmp_path: Path, arch: str, mcore_tp1) -> None:
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import hf_to_mcore, load_hf_into_chunks, mcore_to_hf

    hf = hfutil.make_hf_model(arch, tmp_path / "hf")
    recipe = hfutil.write_recipe(hf, tmp_path / f"{arch}.toml")
    step_dir = hf_to_mcore(hf, tmp_path / "ck", recipe=str(recipe))
    assert (tmp_path / "ck" / "latest").read_text().strip() == "0"
    assert ckpt.verify(step_dir) is None

    toks = hfutil.tokens(ARCHS[arch]["vocab_size"])
    ref = hfutil.hf_logits(hf, toks)
    assert ref.std() > 0.01
    vocab = ref.shape[-1]

    chunks, c, padded = hfutil.megatron_model(recipe)
    ckpt.load_latest(tmp_path / "ck", chunks, None, None, "", with_optimizer=False)
    got = hfutil.megatron_logits(chunks[0], toks)
    assert (got[..., :vocab] - ref).abs().max().item() < TOL

    direct, c, padded = hfutil.megatron_model(recipe)
    load_hf_into_chunks(hf, direct, c, padded)
    got = hfutil.megatron_logits(direct[0], toks)
    assert (got[..., :vocab] - ref).abs().max().item() < TOL

    back = mcore_to_hf(tmp_path / "ck", tmp_path / "back", recipe=str(recipe))
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (hfutil.hf_logits(back, toks) - ref).abs().max().item() == 0.0


def test_sharded_export_and_cli(tmp_path: Path) -> None:
    """`recipec convert` end to end as a user runs it (no --recipe: import-hf's), sharded output."""
    hf = hfutil.make_hf_model("qwen3_moe", tmp_path / "hf")
    recipe = hfutil.write_recipe(hf, tmp_path / "q.toml")
    env = hfutil.clean_env()
    recipec = [sys.executable, "-c", "from recipec.compiler.cli import main; main()"]
    run = subprocess.run(recipec + ["convert", "hf-to-mcore", str(hf), "-o", str(tmp_path / "ck")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run(recipec + ["convert", "mcore-to-hf", str(tmp_path / "ck"), "--recipe", str(recipe),
                                    "-o", str(tmp_path / "back"), "--max-shard-size", "100KB"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _tensors(hf), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    toks = hfutil.tokens(256)
    assert (hfutil.hf_logits(tmp_path / "back", toks) - hfutil.hf_logits(hf, toks)).abs().max().item() == 0.0
    # A user mistake is a message and exit 2, not a traceback.
    bad = subprocess.run(recipec + ["convert", "mcore-to-hf", str(tmp_path / "nope"), "--recipe", str(recipe),
                                    "-o", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no recipec/Megatron dist checkpoint" in bad.stderr


def test_recipe_that_does_not_match_the_weights(tmp_path: Path, mcore_tp1) -> None:
    from recipec.compiler.errors import RecipeError
    from recipec.runtime.hf.convert import hf_to_mcore

    hf = hfutil.make_hf_model("llama2", tmp_path / "hf")
    recipe = hfutil.write_recipe(hf, tmp_path / "l.toml")
    with pytest.raises(RecipeError, match="model.hidden_size = 128 but"):
        hf_to_mcore(hf, tmp_path / "ck", recipe=str(recipe), overrides=["model.hidden_size=128"])
