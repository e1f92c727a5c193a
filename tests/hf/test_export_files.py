"""What `mcore-to-hf` writes besides the weights (runtime/hf/export_files.py), without converting
anything: token ids from each kind of tokenizer and their bounds, generation_config.json built
from the source model's (only well-formed sampling defaults kept), and tokenizer files copied
without the rest of the tokenizer's directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil
from hfutil import ARCHS
from recipec.compiler.api import build
from recipec.compiler.errors import RecipeError
from recipec.compiler.hf_import import recipe_from_hf
from recipec.runtime.hf.export_files import (
    copy_tokenizer_files,
    generation_config,
    plan_export,
    token_ids,
)

IDS = {"bos_token_id": 251, "eos_token_id": 252, "pad_token_id": 253}


def _config(tmp_path: Path, *overrides: str, vocab: int = 256):
    """The compiled import-hf recipe of a config.json-only llama2 directory (with a tokenizer, when made)."""
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**ARCHS["llama2"], "vocab_size": vocab}))
    (tmp_path / "r.toml").write_text(recipe_from_hf(d))
    return build(tmp_path / "r.toml", overrides, artifact_dir=str(tmp_path / "build")).config


def test_token_ids_of_each_tokenizer_kind(tmp_path: Path) -> None:
    hfutil.make_tokenizer(tmp_path / "tok")
    hf = _config(tmp_path, "tokenizer.type=huggingface", f"tokenizer.path={tmp_path / 'tok'}")
    assert token_ids(hf) == IDS
    assert token_ids(_config(tmp_path, "tokenizer.type=byte", vocab=300)) == {"eos_token_id": 256, "pad_token_id": 256}
    assert token_ids(_config(tmp_path, "tokenizer.type=null")) == {}  # ids are the data: none to name


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    """(The byte tokenizer's bound is the compiler's: model.vocab_size >= 257.)"""
    hfutil.make_tokenizer(tmp_path / "tok")
    c = _config(tmp_path, "tokenizer.type=huggingface", f"tokenizer.path={tmp_path / 'tok'}", vocab=252)
    with pytest.raises(RecipeError, match=r"huggingface tokenizer has eos_token_id 252, outside the model's "
                                          r"vocabulary \(model\.vocab_size = 252\)"):
        token_ids(c)


def test_a_directory_that_is_not_a_tokenizer_is_a_recipe_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    c = _config(tmp_path, "tokenizer.type=huggingface", f"tokenizer.path={tmp_path / 'empty'}")
    with pytest.raises(RecipeError, match=r"tokenizer\.path = .*empty' cannot be loaded as a Hugging Face tokenizer"):
        plan_export(c)


def test_generation_config_keeps_the_source_sampling_defaults_and_stop_ids(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": "x", "repetition_penalty": float("nan"),
        "eos_token_id": [252, 7], "bos_token_id": 1, "max_length": 10**12, "transformers_version": "4.45.0"}))
    assert generation_config(IDS, tmp_path) == {"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                "eos_token_id": [252, 7], "bos_token_id": 251, "pad_token_id": 253}
    # a stop list without the tokenizer's eos is another model's: the tokenizer's eos wins
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert generation_config(IDS, tmp_path) == {"do_sample": False, **IDS}
    assert generation_config(IDS, None) == {"do_sample": False, **IDS}


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"{", b"[" * 50_000])
def test_an_unreadable_source_generation_config_gives_greedy_defaults(tmp_path: Path, body: bytes,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "generation_config.json").write_bytes(body)
    with caplog.at_level(logging.WARNING, logger="recipec.runtime"):
        assert generation_config(IDS, tmp_path) == {"do_sample": False, **IDS}
    assert "is not a readable generation config" in caplog.text


def test_only_tokenizer_files_are_copied(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    hfutil.make_tokenizer(src)
    for name in ("config.json", "model.safetensors", "merges.txt", "special_tokens_map.json"):
        (src / name).write_text(name)
    out.mkdir()
    (out / "config.json").write_text("the export's")
    copied = copy_tokenizer_files(src, out)
    assert sorted(copied) == ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(copied + ["config.json"])
    assert (out / "config.json").read_text() == "the export's"
    assert copy_tokenizer_files(src, src) == copied  # exporting into the tokenizer's own directory
