"""`recipec import-hf`: config.json -> recipe, pure Python (no torch, no transformers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hfutil import ARCHS, REPO
from recipec.compiler.api import build
from recipec.compiler.cli import main
from recipec.compiler.errors import RecipeError
from recipec.compiler.hf_import import hf_config, recipe_from_hf

FAMILY = {"llama31": ("llama", "_base/llama31"), "llama32": ("llama", "_base/llama32"),
          "llama2": ("llama", "_base/llama2"), "qwen2": ("qwen2", "_base/qwen25"), "qwen3": ("qwen3", "_base/qwen3"),
          "mistral": ("mistral", "_base/mistral"), "mixtral": ("mixtral", "_base/mixtral"),
          "qwen3_moe": ("qwen3_moe", "_base/qwen3_moe")}


def _config_dir(tmp_path: Path, arch: str, **changes) -> Path:
    """A directory with only a config.json (what transformers would write, v4 spelling)."""
    cfg = {**ARCHS[arch], **changes}
    cfg.pop("torch_dtype", None)
    d = tmp_path / arch
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_field_is_mapped_and_compiles(tmp_path: Path, arch: str) -> None:
    d = _config_dir(tmp_path, arch)
    (tmp_path / "r.toml").write_text(recipe_from_hf(d))
    m = build(tmp_path / "r.toml").config.model
    cfg = ARCHS[arch]
    family, base = FAMILY[arch]
    assert f'"{base}"' in recipe_from_hf(d) and '"_base/pretrain"' in recipe_from_hf(d)
    assert m.architecture == family
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (2, 64, cfg["intermediate_size"])
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels) == (4, 2, cfg.get("head_dim", 16))
    assert m.vocab_size == cfg["vocab_size"] and m.norm_epsilon == cfg["rms_norm_eps"]
    assert m.rotary_base == cfg["rope_theta"]
    assert m.share_embeddings_and_output_weights == cfg.get("tie_word_embeddings", False)
    assert m.qk_layernorm == (family in ("qwen3", "qwen3_moe"))
    assert m.add_qkv_bias == (family == "qwen2") and not m.add_bias_linear
    if "rope_scaling" in cfg:
        assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", cfg["rope_scaling"]["factor"])
    else:
        assert m.rope_scaling is None
    if family in ("mixtral", "qwen3_moe"):
        assert m.num_moe_experts == 4 and m.moe_router_topk == 2
        assert m.moe_ffn_hidden_size == cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    else:
        assert m.num_moe_experts is None
    # ... and back: the config.json export describes the same model.
    back = hf_config(m)
    assert back["model_type"] == cfg["model_type"] and back["num_key_value_heads"] == 2


def test_transformers5_rope_parameters_are_read(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, "llama2", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    (tmp_path / "r.toml").write_text(recipe_from_hf(d))
    m = build(tmp_path / "r.toml").config.model
    assert (m.rotary_base, m.rope_scaling, m.rope_scaling_factor) == (1e6, "linear", 2.0)


@pytest.mark.parametrize("arch, changes, field", [
    ("mistral", {"sliding_window": 4096}, "config.json:sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096}, "config.json:use_sliding_window"),
    ("llama2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json:rope_scaling.rope_type"),
    ("llama31", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "config.json:rope_scaling.low_freq_factor"),
    ("llama2", {"attention_bias": True}, "config.json:attention_bias"),
    ("llama2", {"mlp_bias": True}, "config.json:mlp_bias"),
    ("llama2", {"hidden_act": "gelu_pytorch_tanh"}, "config.json:hidden_act"),
    ("llama2", {"model_type": "gpt_neox"}, "config.json:model_type"),
    ("qwen3_moe", {"norm_topk_prob": False}, "config.json:norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "config.json:mlp_only_layers"),
])
def test_unsupported_config_fails_naming_the_field(tmp_path: Path, arch: str, changes: dict, field: str) -> None:
    d = _config_dir(tmp_path, arch, **changes)
    with pytest.raises(RecipeError) as err:
        recipe_from_hf(d)
    assert f"[{field}]" in str(err.value)
    result = CliRunner().invoke(main, ["import-hf", str(d)])
    assert result.exit_code == 2 and field in result.output and "Traceback" not in result.output


def test_cli_writes_recipe_and_notes_tokenizer(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, "qwen2")
    (d / "tokenizer.json").write_text("{}")
    out = tmp_path / "imported.toml"
    result = CliRunner().invoke(main, ["import-hf", str(d), "-o", str(out), "--base", "finetune"])
    assert result.exit_code == 0, result.output
    c = build(out).config
    assert c.name == "imported"
    assert (c.tokenizer.type, c.tokenizer.path) == ("huggingface", str(d.resolve()))
    assert c.checkpoint.pretrained == str(d.resolve())


def test_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["import-hf", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_compiler_never_imports_the_runtime() -> None:
    code = ("import sys; import recipec.compiler.cli, recipec.compiler.hf_import; "
            "bad = [m for m in ('torch', 'transformers', 'megatron', 'recipec.runtime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
