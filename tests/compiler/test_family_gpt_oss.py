"""GPT-OSS, compile side (no torch): config.json import/export, the bundled recipes' parameter
counts against the model card, their layouts against the H100 memory estimate, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipec.compiler import build
from recipec.compiler.errors import RecipeError
from recipec.compiler.estimate import active_params, total_params
from recipec.compiler.hardware import ACCELERATORS
from recipec.compiler.hf_fields import HFImportError
from recipec.compiler.hf_import import hf_config, model_fields, recipe_from_hf

# openai/gpt-oss-120b config.json (huggingface.co/openai/gpt-oss-120b/raw/main/config.json) without its
# quantization_config; gpt-oss-20b differs in num_hidden_layers 24 and num_local_experts 32.
REAL_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 201088,
}
REAL_20B = {**REAL_120B, "num_hidden_layers": 24, "num_local_experts": 32,
            "layer_types": ["sliding_attention", "full_attention"] * 12}
MXFP4 = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                    "lm_head"], "quant_method": "mxfp4"}
# "gpt-oss-120b & gpt-oss-20b Model Card" (OpenAI, 2025), table 1: total parameters, and active
# parameters per token, which count the unembedding but not the embedding table.
PUBLISHED = {"gpt_oss_20b": (20.91e9, 3.61e9), "gpt_oss_120b": (116.83e9, 5.13e9)}
ARCH_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size",
             "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "window_size", "window_attn_skip_freq",
             "softmax_type", "activation", "glu_linear_offset", "activation_func_clamp_value", "add_bias_linear",
             "rotary_base", "rope_scaling", "rope_scaling_factor", "rope_original_max_position_embeddings",
             "rope_beta_fast", "rope_beta_slow", "rope_yarn_truncate", "moe_router_pre_softmax", "norm_epsilon",
             "share_embeddings_and_output_weights", "max_position_embeddings", "moe_router_load_balancing_type")


def _write(tmp_path: Path, cfg: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("name, cfg", [("gpt_oss_20b", REAL_20B), ("gpt_oss_120b", REAL_120B)])
def test_published_config_imports_as_the_bundled_model(name: str, cfg: dict) -> None:
    """The real config.json maps onto exactly the model _models/<name> bundles. (The imported recipe
    itself does not compile: import-hf's default of one 8-GPU node cannot hold the model.)"""
    fields, family = model_fields(cfg)
    bundled = build(name).config.model
    assert family.name == "gpt_oss"
    assert {k: fields[k] for k in ARCH_KEYS} == {k: getattr(bundled, k) for k in ARCH_KEYS}
    assert (fields["window_size"], fields["window_attn_skip_freq"]) == (127, 2)  # 128 keys including the query


def test_export_round_trips_through_import() -> None:
    """config.json written for the bundled model imports back to the same [model] fields."""
    model = build("gpt_oss_20b").config.model
    cfg = hf_config(model, dtype="bfloat16")
    assert cfg["architectures"] == ["GptOssForCausalLM"] and cfg["model_type"] == "gpt_oss"
    assert cfg["layer_types"] == REAL_20B["layer_types"] and cfg["sliding_window"] == 128
    assert cfg["rope_scaling"]["truncate"] is False and cfg["swiglu_limit"] == 7.0
    fields, family = model_fields(cfg)
    assert family.name == "gpt_oss"
    assert all(fields[k] == getattr(model, k) for k in ARCH_KEYS if k in fields), fields


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_card(name: str) -> None:
    c = build(name)
    m = c.config.model
    total, active = PUBLISHED[name]
    assert abs(total_params(m, m.vocab_size) - total) / total < 0.01
    assert abs(c.plan.params_total - total) / total < 0.01
    embedding = m.vocab_size * m.hidden_size
    assert abs(active_params(m, m.vocab_size) - embedding - active) / active < 0.01


@pytest.mark.parametrize("name", ["gpt_oss_20b", "gpt_oss_120b", "gpt_oss_20b_sft", "gpt_oss_120b_sft"])
def test_bundled_layouts_fit_h100(name: str) -> None:
    c = build(name)
    assert c.config.launch.accelerator == "H100-80GB" and c.config.launch.gpus_per_node == 8
    assert c.plan.memory_gib["total"] < ACCELERATORS["H100-80GB"].memory_gib, c.plan.memory_gib


def test_tiny_recipe_compiles_for_cpu() -> None:
    m = build("gpt_oss_tiny", ["launch.gpus_per_node=2", "parallel.expert_model_parallel_size=2"]).config.model
    assert m.architecture == "gpt_oss" and m.softmax_type == "learnable" and m.window_size == 15


@pytest.mark.parametrize("change, field, words", [
    ({"quantization_config": MXFP4}, "quantization_config", "dequantize"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 12}, "layer_types", "not periodic"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha", "1.702"),
    ({"attention_bias": False}, "attention_bias", "cannot be expressed"),
    ({"rope_scaling": {**REAL_120B["rope_scaling"], "attention_factor": 2.0}}, "rope_scaling.attention_factor",
     "attention_factor"),
])
def test_unexpressible_configs_name_the_field(tmp_path: Path, change: dict, field: str, words: str) -> None:
    with pytest.raises(HFImportError) as info:
        recipe_from_hf(_write(tmp_path, {**REAL_20B, **change}))
    text = str(info.value)
    assert f"config.json:{field}" in text and words in text, text


def test_gpt_oss_without_experts_is_refused() -> None:
    with pytest.raises(RecipeError, match="mixture of experts"):
        build("gpt_oss_20b", ["~model.num_moe_experts"])
