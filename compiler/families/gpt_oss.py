"""GPT-OSS (openai/gpt-oss-20b, -120b): the config.json <-> [model] bridge of model_type "gpt_oss".

What makes it its own family, each mapped onto a generic Megatron-Core feature:
- attention sinks: a learned per-head logit joined to every softmax (`softmax_type = "learnable"`);
- alternating attention: layer_types sliding/full/sliding/... (`window_attn_skip_freq = 2`), with a
  window of `sliding_window` keys *including the query itself*, which is Megatron's
  `window_size = sliding_window - 1` (keys to the left; Megatron-Bridge maps it the same way);
  full attention on every layer imports without a window;
- biases on q/k/v/o, on the router and on every expert (`add_bias_linear`);
- YaRN RoPE (factor 32 over 4096 positions, beta 32/1, `truncate = false`: `rope_yarn_truncate`), or
  plain RoPE (rope_type "default");
- MoE experts with a clamped SwiGLU variant: `(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)` with
  `g = clamp(gate, max=7)`, i.e. quick_gelu + `glu_linear_offset = 1` + `activation_func_clamp_value`;
- a router that takes the top-k logits, then softmaxes them (`moe_router_pre_softmax = false`).

HF `hidden_act` is not read: GptOssExperts hard-codes the activation (only `swiglu_alpha`, which
quick_gelu fixes at 1.702, and `swiglu_limit`). The published checkpoints store the experts in
MXFP4 (`quantization_config`); importing one is refused (see `_refuse_quantized`).
"""

from __future__ import annotations

from typing import Any

from ..hf_fields import HFConfig, HFImportError, fail
from ..schema import ModelConfig
from ..text import shown
from . import _decoder as d
from .base import Family, FamilyProblem, ModelFields

# transformers' GptOssConfig defaults, used when config.json leaves a field out.
DEFAULT_THETA = 150000.0
DEFAULT_WINDOW = 128
DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
QUICK_GELU_ALPHA = 1.702  # Megatron-Core's quick_gelu: x * sigmoid(1.702 x)
SLIDING, FULL = "sliding_attention", "full_attention"


class _AnyActivation(dict[str, str]):
    """hidden_act of any value is accepted and ignored: GptOssExperts never reads it."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "quick_gelu"


def layer_pattern(num_layers: int, skip_freq: int | None) -> list[str]:
    """HF layer_types of a windowed model: Megatron windows layer n (1-based) unless n % skip_freq == 0."""
    return [FULL if skip_freq is not None and (i + 1) % skip_freq == 0 else SLIDING for i in range(num_layers)]


def _import_window(c: HFConfig, m: ModelFields, num_layers: int) -> None:
    """sliding_window + layer_types -> window_size + window_attn_skip_freq (a period Megatron can express);
    nothing for a model without sliding layers."""
    types = c.texts("layer_types")
    if types is None:  # GptOssConfig's default: sliding on even (0-based) layers
        types = layer_pattern(num_layers, 2)
    if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise fail("layer_types", f"layer_types must list {num_layers} entries of {SLIDING!r}/{FULL!r}, got "
                   f"{shown(repr(types), 120)}")
    if SLIDING not in types:  # full attention everywhere (as transformers, sliding_window is then unused)
        return  # _base/gpt_oss.toml sets no window (the published models' is in recipes_toml/_models/)
    if "sliding_window" in c.data and c.data["sliding_window"] is None:
        raise fail("sliding_window", "sliding_window is null but layer_types has sliding layers",
                   hint="give the window (gpt-oss: 128) or make every layer full_attention")
    window = c.integer("sliding_window", DEFAULT_WINDOW)
    freq = None if FULL not in types else types.index(FULL) + 1
    if types != layer_pattern(num_layers, freq):
        raise fail("layer_types", f"layer_types {shown(repr(types), 120)} is not periodic (full attention on every "
                   "Nth layer, sliding elsewhere), which is what Megatron's window_attn_skip_freq expresses")
    m.put("window_size", window - 1, "sliding_window")  # HF counts the query itself, Megatron the keys left of it
    if freq is not None:
        m.put("window_attn_skip_freq", freq, "layer_types")


def _import_rope(c: HFConfig, m: ModelFields) -> None:
    """RoPE as GptOssConfig reads it: its YaRN defaults when config.json names no RoPE at all, plain RoPE
    for rope_type "default" (nothing written: _base/gpt_oss.toml sets no scaling)."""
    if c.table("rope_parameters") is None and c.table("rope_scaling") is None:
        c = HFConfig({**c.data, "rope_scaling": DEFAULT_YARN}, c.prefix)
    if not c.has("rope_theta") and not (c.table("rope_parameters") and c.table("rope_parameters").has("rope_theta")):
        c = HFConfig({**c.data, "rope_theta": DEFAULT_THETA}, c.prefix)
    d.import_rope(c, m, yarn=True)
    _theta, scaling, _field = d.rope_parameters(c)
    if scaling is None:
        return
    if scaling.has("attention_factor"):
        raise fail(f"{scaling.prefix}attention_factor", "an explicit YaRN attention_factor cannot be expressed: "
                   "Megatron derives it from factor (and mscale/mscale_all_dim)")
    if m.get("rope_scaling") == "yarn":
        m.put("rope_yarn_truncate", scaling.flag("truncate", True), f"{scaling.prefix}truncate")


def _refuse_quantized(c: HFConfig) -> None:
    q = c.table("quantization_config")
    if q is None:
        return
    method = q.text("quant_method", "?")
    raise fail("quantization_config", f"the weights are quantized (quant_method {shown(repr(method))}; the published "
               "gpt-oss checkpoints store their experts in MXFP4), and recipec converts only bf16/fp16/fp32 weights",
               hint="dequantize first: load it with transformers (quantization_config=Mxfp4Config(dequantize=True)) and "
               "save_pretrained a bf16 copy; or start from recipes_toml/gpt_oss_20b.toml / gpt_oss_120b.toml for the "
               "architecture alone")


def _import(c: HFConfig, m: ModelFields) -> None:
    _refuse_quantized(c)
    # GptOssConfig's own defaults where the shared decoder import would assume others
    c = HFConfig({"rms_norm_eps": 1e-5, "head_dim": 64, **c.data}, c.prefix)
    d.import_decoder(c, m, qkv_bias=True, activations=_AnyActivation())
    if not c.flag("attention_bias", True):
        raise fail("attention_bias", "attention_bias = false cannot be expressed: GPT-OSS's experts and router have "
                   "biases, and Megatron's add_bias_linear biases q/k/v/o as well")
    m.put("add_bias_linear", True, "attention_bias")
    m.put("add_qkv_bias", False)  # add_bias_linear already biases linear_qkv
    alpha = c.number("swiglu_alpha", QUICK_GELU_ALPHA)
    if alpha != QUICK_GELU_ALPHA:
        raise fail("swiglu_alpha", f"swiglu_alpha = {alpha}: Megatron's quick_gelu fixes the sigmoid gain at "
                   f"{QUICK_GELU_ALPHA}")
    m.put("activation", "quick_gelu", "swiglu_alpha")
    m.put("glu_linear_offset", 1.0)
    m.put("activation_func_clamp_value", c.number("swiglu_limit", 7.0, min=0.0), "swiglu_limit")
    m.put("softmax_type", "learnable")
    _import_window(c, m, m["num_layers"])
    _import_rope(c, m)
    d.import_moe(c, m)  # experts are intermediate_size wide
    d.refuse_moe_extras(c)
    # HF adds router_aux_loss_coef's loss only with output_router_logits, off in the published configs
    # (Megatron-Bridge's GPT-OSS provider likewise trains without a load-balancing loss).
    balance = "aux_loss" if c.flag("output_router_logits") else "none"
    m.put("moe_router_load_balancing_type", balance, "output_router_logits")
    m.put("moe_router_pre_softmax", False)  # top-k of the logits, then softmax over those k
    m.put("moe_router_score_function", "softmax")


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    """config.json of a GptOssForCausalLM computing exactly the recipe's model."""
    wrong = []
    if model.normalization != "RMSNorm" or not model.gated_linear_unit or model.position_embedding_type != "rope":
        wrong.append("RMSNorm, a gated MLP and RoPE")
    if model.activation != "quick_gelu" or model.glu_linear_offset != 1.0 or model.activation_func_clamp_value is None:
        wrong.append("activation quick_gelu with glu_linear_offset 1 and activation_func_clamp_value set")
    if not model.add_bias_linear or model.qk_layernorm or model.softmax_type != "learnable":
        wrong.append("add_bias_linear, no qk_layernorm, softmax_type learnable")
    if not model.is_moe or model.moe_shared_expert_intermediate_size or model.moe_router_pre_softmax \
            or model.moe_router_score_function != "softmax" or model.moe_router_load_balancing_type not in (
                "none", "aux_loss"):
        wrong.append("routed experts only, top-k then softmax (moe_router_pre_softmax false), aux_loss or no "
                     "load balancing")
    if model.rope_scaling not in (None, "yarn") or model.rotary_percent != 1.0:
        wrong.append("full RoPE, plain or YaRN")
    if wrong:
        raise HFImportError(f"gpt_oss export needs {'; '.join(wrong)}: GptOssForCausalLM computes nothing else")
    assert model.num_moe_experts is not None and model.moe_ffn_hidden_size is not None
    if model.window_size is None:
        types, window = [FULL] * model.num_layers, None
    else:
        types, window = layer_pattern(model.num_layers, model.window_attn_skip_freq), model.window_size + 1
    # hidden_act is not read by GptOssForCausalLM (its experts fix the activation)
    cfg.update(d.decoder_keys(model, hidden_act="silu", intermediate_size=model.moe_ffn_hidden_size))
    cfg.update({
        "attention_bias": True,
        "num_local_experts": model.num_moe_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "router_aux_loss_coef": model.moe_aux_loss_coeff,
        "output_router_logits": model.moe_router_load_balancing_type != "none",
        "swiglu_alpha": QUICK_GELU_ALPHA,
        "swiglu_limit": model.activation_func_clamp_value,
        "sliding_window": window,
        "layer_types": types,
    })
    if model.rope_scaling == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                               "original_max_position_embeddings": model.rope_original_max_position_embeddings,
                               "beta_fast": model.rope_beta_fast, "beta_slow": model.rope_beta_slow,
                               "truncate": model.rope_yarn_truncate}
        if (model.rope_mscale, model.rope_mscale_all_dim) != (1.0, 0.0):
            if not model.rope_mscale or not model.rope_mscale_all_dim:  # HF then ignores both
                raise HFImportError("gpt_oss export: rope_mscale/rope_mscale_all_dim other than 1/0 need both "
                                    "non-zero, or transformers' YaRN ignores them")
            cfg["rope_scaling"].update(mscale=model.rope_mscale, mscale_all_dim=model.rope_mscale_all_dim)
    else:  # GptOssConfig turns a missing rope_scaling into its YaRN default: say "default" outright
        cfg["rope_scaling"] = {"rope_type": "default"}


def _validate(model: ModelConfig) -> list[FamilyProblem]:
    """GPT-OSS is a mixture of experts: its weight table and HF class have no dense MLP."""
    if not model.is_moe:
        return [FamilyProblem("model.num_moe_experts", "model.architecture = \"gpt_oss\" is a mixture of experts",
                              hint="set model.num_moe_experts (gpt-oss-20b: 32, gpt-oss-120b: 128)")]
    return []


FAMILIES = (
    Family(name="gpt_oss", summary="GPT-OSS 20B/120B: attention sinks, alternating 128-token sliding window, "
           "biases, YaRN, MoE with a clamped SwiGLU", hf_model_types=("gpt_oss",), hf_class="GptOssForCausalLM",
           base="_base/gpt_oss", import_hf=_import, export_hf=_export, validate=_validate),
)
