"""The README's Hugging Face round trip as a user runs it (issue 14 item 6).

`recipec import-hf ./hf -o my_llama.toml`, `recipec convert hf-to-mcore ./hf --recipe my_llama.toml
-o ckpt/`, `recipec convert mcore-to-hf ckpt/ --recipe my_llama.toml -o ./exported`, each a real
process in the user's directory, on a tiny fp32 Llama with its own tokenizer: every tensor comes
back bit-identical, and transformers' loaders (model, tokenizer, generation config) work on the
export alone. Was: import-hf left precision.dtype at the base's bf16, so the fp32 weights came back
rounded; the export had no token ids, no generation_config.json, and no special_tokens-aware tokenizer.
The bf16 variant, the byte tokenizer and the failure cases run in this process (cheaper)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil
from hfutil import SPECIAL_TOKENS

IDS = {f"{k.removesuffix('_token')}_token_id": i for k, (_, i) in SPECIAL_TOKENS.items() if k != "unk_token"}


def _recipec() -> list[str]:
    """The `recipec` console script a user types (the module's main when it is not installed)."""
    script = Path(sys.executable).with_name("recipec")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from recipec.compiler.cli import main; main()"]


def _run(cwd: Path, *args: str) -> str:
    proc = subprocess.run([*_recipec(), *args], cwd=cwd, env=hfutil.clean_env(), capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, f"recipec {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_bit_identical(a_dir: Path, b_dir: Path, dtype: torch.dtype) -> None:
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype, (name, a[name].dtype, b[name].dtype)
        assert torch.equal(a[name], b[name]), name


def _tiny_model_with_tokenizer(directory: Path, dtype: str = "float32") -> Path:
    """A Llama whose config.json names its tokenizer's special ids, as a hub model's does."""
    hfutil.make_hf_model("llama2", directory, dtype=dtype, **IDS)
    hfutil.make_tokenizer(directory)
    return directory


def test_readme_commands_round_trip_an_fp32_model_with_its_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    hf = _tiny_model_with_tokenizer(tmp_path / "hf")
    _run(tmp_path, "import-hf", "./hf", "-o", "my_llama.toml")
    recipe = tomllib.loads((tmp_path / "my_llama.toml").read_text())
    assert recipe["precision"] == {"dtype": "fp32"}  # from config.json's dtype = "float32"
    _run(tmp_path, "convert", "hf-to-mcore", "./hf", "--recipe", "my_llama.toml", "-o", "ckpt/")
    _run(tmp_path, "convert", "mcore-to-hf", "ckpt/", "--recipe", "my_llama.toml", "-o", "./exported")
    out = tmp_path / "exported"

    _assert_bit_identical(hf, out, torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")
    assert {k: config[k] for k in IDS} == IDS  # from the recipe's tokenizer

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (251, 252, 253)
    assert generation.do_sample is False

    source_tok, tok = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(out)
    text = "w1 w17 w249 unknown w3"
    assert tok(text).input_ids == source_tok(text).input_ids == [1, 17, 249, 250, 3]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (251, 252, 253)

    model = AutoModelForCausalLM.from_pretrained(out)  # dtype from config.json, as a user loads it
    assert model.dtype == torch.float32
    toks = hfutil.tokens(250)
    assert torch.equal(model(toks).logits, hfutil.hf_logits(hf, toks))
    generated = model.generate(toks[:1, :4], max_new_tokens=2, attention_mask=torch.ones_like(toks[:1, :4]))
    assert generated.shape == (1, 6)


def test_bf16_model_round_trips_in_bf16_with_the_byte_tokenizer(tmp_path: Path, mcore_tp1) -> None:
    """bf16 weights -> precision.dtype = "bf16" -> the same bf16 bits (the local spec's fp32 norms
    included); the byte tokenizer gives eos = pad = 256 and no bos."""
    from recipec.compiler.hf_import import recipe_from_hf
    from recipec.runtime.hf.convert import hf_to_mcore, mcore_to_hf

    hf = hfutil.make_hf_model("llama2", tmp_path / "hf", dtype="bfloat16", vocab_size=320)
    recipe = tmp_path / "bf.toml"
    recipe.write_text(recipe_from_hf(hf, name="bf"))
    assert tomllib.loads(recipe.read_text())["precision"] == {"dtype": "bf16"}
    hf_to_mcore(hf, tmp_path / "ck", recipe=str(recipe))
    out = mcore_to_hf(tmp_path / "ck", tmp_path / "out", recipe=str(recipe), overrides=["tokenizer.type=byte"])
    _assert_bit_identical(hf, out, torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert (config["eos_token_id"], config["pad_token_id"], config.get("bos_token_id")) == (256, 256, None)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"do_sample": False, "eos_token_id": 256, "pad_token_id": 256}
    assert not (out / "tokenizer.json").exists()  # the byte tokenizer has no files


def test_converting_fp32_weights_into_a_bf16_recipe_says_it_rounds(tmp_path: Path, mcore_tp1,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from recipec.runtime.hf.convert import hf_to_mcore

    hf = hfutil.make_hf_model("llama2", tmp_path / "hf")
    recipe = hfutil.write_recipe(hf, tmp_path / "l.toml")
    with caplog.at_level(logging.WARNING, logger="recipec.runtime"):
        hf_to_mcore(hf, tmp_path / "ck", recipe=str(recipe), overrides=["precision.dtype=bf16"])
    assert "holds fp32 weights and the recipe's precision.dtype is bf16: the checkpoint rounds them" in caplog.text


def test_export_without_its_tokenizer_stops_before_writing_weights(tmp_path: Path, mcore_tp1) -> None:
    from recipec.compiler.errors import RecipeError
    from recipec.runtime.hf.convert import hf_to_mcore, mcore_to_hf

    hf = _tiny_model_with_tokenizer(tmp_path / "hf")
    recipe = hfutil.write_recipe(hf, tmp_path / "l.toml")
    hf_to_mcore(hf, tmp_path / "ck", recipe=str(recipe))
    gone = tmp_path / "moved_away"
    with pytest.raises(RecipeError, match=r"tokenizer\.path = .*moved_away' is not a directory.*tokenizer\.type=null"):
        mcore_to_hf(tmp_path / "ck", tmp_path / "out", recipe=str(recipe), overrides=[f"tokenizer.path={gone}"])
    assert not (tmp_path / "out").exists()
