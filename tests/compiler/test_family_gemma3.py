"""The gemma3 family's compiler half (no torch): bundled recipes, published sizes, the config.json bridge.

Published parameter counts: Gemma 3 Technical Report (arXiv:2503.19786), Table 1, embedding +
non-embedding parameters. The 4B/12B/27B checkpoints are multimodal: their published totals
(4.3B/12.2B/27.4B on the model cards) include the 417M SigLIP vision encoder, which the text
model recipec trains does not have, so the vision column is left out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from recipec.compiler import build
from recipec.compiler.cli import main
from recipec.compiler.errors import RecipeError
from recipec.compiler.estimate import total_params
from recipec.compiler.hardware import ACCELERATORS
from recipec.compiler.hf_import import (
    HFImportError,
    hf_config,
    model_fields,
    recipe_from_hf,
)

PUBLISHED = {  # recipe: (embedding + non-embedding parameters, Table 1 of the report)
    "gemma3_1b": 302e6 + 698e6,
    "gemma3_4b": 675e6 + 3_209e6,
    "gemma3_12b": 1_012e6 + 10_759e6,
    "gemma3_27b": 1_416e6 + 25_600e6,
}
H100_GIB = ACCELERATORS["H100-80GB"].memory_gib

# google/gemma-3-1b-pt's config.json as transformers 4.5x wrote it (sliding_window_pattern, rope_theta,
# rope_local_base_freq); the 27B text_config in transformers 5's spelling (layer_types, rope_parameters).
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}
# The 4B text tower in the 4.x spelling with the older rope_scaling "type" key.
GEMMA3_4B = {**GEMMA3_1B, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
             "num_hidden_layers": 34, "num_key_value_heads": 4, "sliding_window": 1024, "vocab_size": 262208,
             "max_position_embeddings": 131072, "rope_scaling": {"factor": 8.0, "type": "linear"}}
GEMMA3_27B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 128,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 5376, "intermediate_size": 21504,
    "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 62,
    "num_key_value_heads": 16, "query_pre_attn_scalar": 168, "rms_norm_eps": 1e-06, "sliding_window": 1024,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10 + ["sliding_attention"] * 2,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    "tie_word_embeddings": True, "dtype": "bfloat16", "vocab_size": 262208,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published_and_layout_fits(name: str) -> None:
    c = build(name)
    m = c.config.model
    published = PUBLISHED[name]
    assert abs(total_params(m, m.vocab_size) - published) / published < 0.01
    assert abs(c.plan.params_total - published) / published < 0.01
    assert c.plan.memory_gib["total"] < H100_GIB, c.plan.memory_gib
    assert (m.architecture, m.sandwich_norm, m.scale_embeddings, m.window_attn_skip_freq) == ("gemma3", True, True, 6)


def test_finetune_recipes_and_tiny_recipe_build() -> None:
    sft, lora, tiny = build("gemma3_1b_sft"), build("gemma3_1b_lora"), build("gemma3_tiny")
    assert sft.config.peft.method is None and lora.config.peft.method == "lora"
    assert (lora.config.peft.lora_rank, lora.config.peft.lora_alpha) == (8, 16.0)
    assert lora.plan.memory_gib["total"] < H100_GIB and sft.plan.memory_gib["total"] < H100_GIB
    assert tiny.config.launch.accelerator == "cpu" and tiny.config.model.window_size == 15


@pytest.mark.parametrize(("cfg", "recipe", "want"), [
    (GEMMA3_1B, "gemma3_1b", {"window_size": 511, "window_attn_skip_freq": 6, "rotary_base": 1e6,
                              "rotary_base_local": 1e4, "kv_channels": 256, "num_query_groups": 1,
                              "vocab_size": 262144, "max_position_embeddings": 32768}),
    (GEMMA3_4B, "gemma3_4b", {"window_size": 1023, "rope_scaling": "linear", "rope_scaling_factor": 8.0,
                              "num_query_groups": 4, "vocab_size": 262208}),
    (GEMMA3_27B, "gemma3_27b", {"window_size": 1023, "window_attn_skip_freq": 6, "rope_scaling": "linear",
                                "rope_scaling_factor": 8.0, "softmax_scale": 168 ** -0.5, "kv_channels": 128}),
], ids=["1b-transformers4", "4b-transformers4", "27b-transformers5"])
def test_import_matches_the_bundled_model_and_export_round_trips(cfg: dict, recipe: str, want: dict) -> None:
    fields, family = model_fields(cfg)
    assert family.name == "gemma3"
    assert {k: fields.get(k) for k in want} == want
    assert fields["activation"] == "gelu_tanh" and fields["share_embeddings_and_output_weights"]
    assert fields["qk_layernorm"] and fields["layernorm_zero_centered_gamma"] and fields["sandwich_norm"]
    if cfg["query_pre_attn_scalar"] == cfg["head_dim"]:
        assert "softmax_scale" not in fields  # Megatron's default 1/sqrt(head_dim) is the same
    # The bundled _models/ file is what import-hf makes of the published config.json.
    model = build(recipe).config.model
    assert {k: getattr(model, k) for k in fields} == fields
    exported = hf_config(model, dtype="bfloat16")
    assert exported["model_type"] == "gemma3_text" and exported["architectures"] == ["Gemma3ForCausalLM"]
    assert exported["query_pre_attn_scalar"] == cfg["query_pre_attn_scalar"]
    assert exported["sliding_window"] == cfg["sliding_window"]
    assert exported["layer_types"] == (cfg.get("layer_types") or exported["layer_types"])
    again, _ = model_fields(exported)
    assert again == fields


def test_import_hf_writes_a_recipe_that_builds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B))
    recipe = tmp_path / "imported.toml"
    recipe.write_text(recipe_from_hf(tmp_path))
    assert build(recipe).config.model.architecture == "gemma3"


@pytest.mark.parametrize(("change", "field"), [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"model_type": "gemma3"}, "model_type"),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 23},
     "layer_types"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_scaling.rope_type"),
])
def test_unexpressible_config_is_refused_naming_the_field(tmp_path: Path, change: dict, field: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA3_1B, **change}))
    result = CliRunner().invoke(main, ["import-hf", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"config.json:{field}" in result.output, result.output
    with pytest.raises(HFImportError):
        model_fields({**GEMMA3_1B, **change})


def test_a_gemma3_recipe_the_layer_spec_cannot_build_is_refused() -> None:
    with pytest.raises(RecipeError) as info:
        build("gemma3_tiny", ["model.add_bias_linear=true", "model.sandwich_norm=false"])
    text = str(info.value)
    assert "model.add_bias_linear" in text and "model.sandwich_norm" in text
