"""DeepSeek-V3 / V2-Lite, compiler half (no torch): the bundled recipes count the published parameters,
fit their GPUs, import-hf reads the published config.json files into the same [model] as the bundled
recipes (and back), and what transformers' DeepSeek computes differently from Megatron is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from recipec.compiler import build
from recipec.compiler.errors import RecipeError
from recipec.compiler.estimate import active_params, model_flops, total_params
from recipec.compiler.hf_import import (
    HFImportError,
    hf_config,
    model_fields,
    recipe_from_hf,
)
from recipec.compiler.schema import ModelConfig

# deepseek-ai/DeepSeek-V3 config.json (its architecture fields; the published file also has
# quantization_config: FP8 weights, refused below), and deepseek-ai/DeepSeek-V2-Lite config.json.
V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
}
V2_LITE_CONFIG: dict[str, Any] = {
    **{k: v for k, v in V3_CONFIG.items() if k not in ("num_nextn_predict_layers",)},
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "bos_token_id": 100000, "eos_token_id": 100001,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
SHAPE = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
         "kv_channels", "vocab_size", "multi_latent_attention", "qk_layernorm", "q_lora_rank", "kv_lora_rank",
         "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_scaling", "rope_scaling_factor",
         "rope_original_max_position_embeddings", "rope_mscale", "rope_mscale_all_dim", "num_moe_experts",
         "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_first_k_dense",
         "moe_router_score_function", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
         "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
         "share_embeddings_and_output_weights", "norm_epsilon", "rotary_base")


@pytest.mark.parametrize("recipe, total, active", [
    # Main model 671B (HF's 685B adds the 14B MTP module); "37B activated".
    ("deepseek_v3", 671e9, 37e9),
    # "15.7B total, 2.4B activated": DeepSeek counts activated parameters without the input
    # embedding (a lookup), to 2 digits: ours is 2.45B that way (2.66B with it).
    ("deepseek_v2_lite", 15.7e9, 2.4e9),
])
def test_published_sizes_and_the_layout_fits(recipe: str, total: float, active: float) -> None:
    c = build(recipe)
    m = c.config.model
    assert abs(total_params(m, m.vocab_size) - total) / total < 0.01
    assert abs(c.plan.params_total - total) / total < 0.01  # Megatron's padded vocabulary
    without_input_embedding = active_params(m, m.vocab_size) - m.vocab_size * m.hidden_size
    assert abs(without_input_embedding - active) / active < 0.025, without_input_embedding
    assert c.plan.memory_gib["total"] < 79.1, c.plan.memory_gib
    assert c.config.launch.accelerator == "H100-80GB" and c.config.launch.gpus_per_node == 8


def test_the_mtp_option_adds_a_moe_layer_its_projection_and_a_logits_pass() -> None:
    base = build("deepseek_v3")
    mtp = build("deepseek_v3", ["model.mtp_num_layers=1"])
    m = base.config.model
    h, layer_dense = m.hidden_size, 187_107_328 + 2 * m.hidden_size  # MLA + 2 norms of one layer
    moe = 256 * 3 * h * 2048 + 3 * h * 2048 + 256 * h  # routed + shared experts + router
    assert mtp.plan.params_total - base.plan.params_total == layer_dense + moe + 2 * h * h + 3 * h
    assert 11.5e9 < mtp.plan.params_total - base.plan.params_total < 11.8e9
    assert mtp.plan.memory_gib["total"] < 79.1 and mtp.plan.flops_per_step > base.plan.flops_per_step


def test_mla_flops_follow_megatron_formula() -> None:
    """Per token and layer, fwd + bwd: 6 x the MLA projections' weights + 6 s a (q head + v head)."""
    m = build("deepseek_v3").config.model
    dense = attrs.evolve(m, num_moe_experts=None, moe_first_k_dense=0)
    h, a, s = m.hidden_size, m.num_attention_heads, m.seq_length
    projections = h * 1536 + 1536 * a * 192 + h * 576 + 512 * a * 256 + a * 128 * h
    per_token = m.num_layers * (6 * projections + 6 * s * a * (192 + 128) + 18 * h * m.ffn_hidden_size) + 6 * h * 1000
    assert model_flops(dense, 1, 1000) == s * per_token


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("cfg, recipe", [(V3_CONFIG, "deepseek_v3"), (V2_LITE_CONFIG, "deepseek_v2_lite")],
                         ids=["v3", "v2_lite"])
def test_import_of_the_published_config_is_the_bundled_model_and_exports_back(cfg: dict[str, Any],
                                                                               recipe: str) -> None:
    fields, family = model_fields(cfg)
    defaults = ModelConfig()
    bundled = build(recipe).config.model
    assert {k: fields.get(k, getattr(defaults, k)) for k in SHAPE} == {k: getattr(bundled, k) for k in SHAPE}
    assert "mtp_num_layers" not in fields  # transformers' model has no MTP weights to convert
    assert family.base_for(fields) == f"_base/{bundled.architecture}"
    exported = hf_config(bundled, dtype="bfloat16")
    assert exported["architectures"] == cfg["architectures"]
    again, _ = model_fields(exported)
    assert {k: again.get(k) for k in SHAPE} == {k: fields.get(k) for k in SHAPE}


def test_import_hf_writes_a_recipe_that_compiles(tmp_path: Path) -> None:
    """A tiny config through `recipec import-hf` (the published ones need more than import-hf's 8 GPUs)."""
    tiny = {**V3_CONFIG, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
            "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 48,
            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    text = recipe_from_hf(tmp_path)
    assert 'architecture = "deepseek_v3"' in text and "moe_first_k_dense = 1" in text
    assert '"_base/deepseek_v3"' in text


def test_an_all_dense_model_imports_without_experts_and_exports_back() -> None:
    fields, _ = model_fields({**V3_CONFIG, "num_hidden_layers": 3})  # first_k_dense_replace 3: no MoE layer
    assert "num_moe_experts" not in fields and fields["multi_latent_attention"]
    model = build("deepseek_v3", ["model.num_layers=3", "~model.num_moe_experts",
                                  "parallel.expert_model_parallel_size=1"]).config.model
    again, _ = model_fields(hf_config(model))
    assert {k: again.get(k) for k in SHAPE} == {k: fields.get(k) for k in SHAPE}


@pytest.mark.parametrize("change, field", [
    ({"topk_group": 2}, "topk_group"),  # 8 // 2 = 4 experts per group score in Megatron, 2 in transformers
    ({"rope_interleave": False}, "rope_interleave"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"rope_scaling": {**V3_CONFIG["rope_scaling"], "mscale_all_dim": 0, "mscale": 0.707}}, "rope_scaling.mscale"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}, "quantization_config"),
])
def test_what_megatron_computes_differently_is_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(HFImportError) as info:
        model_fields({**V3_CONFIG, **change})
    assert field in str(info.value)


def test_v2_refusals() -> None:
    with pytest.raises(HFImportError, match="norm_topk_prob"):
        model_fields({**V2_LITE_CONFIG, "norm_topk_prob": True})
    with pytest.raises(HFImportError, match="topk_group"):  # V2's group score is the best expert's
        model_fields({**V2_LITE_CONFIG, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3})


def test_family_validation_names_the_key() -> None:
    with pytest.raises(RecipeError) as info:
        build("deepseek_v2_lite", ["model.multi_latent_attention=false"])
    assert "model.multi_latent_attention" in str(info.value)
    with pytest.raises(RecipeError) as info:
        build("deepseek_v3", ["model.moe_router_group_topk=16"])
    assert "model.moe_router_group_topk" in str(info.value)
