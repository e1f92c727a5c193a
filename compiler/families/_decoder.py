"""Shared pieces of the GPT-style decoder families' Hugging Face bridge (not a family itself).

Llama, Mistral, Qwen2/3 and the MoE variants share one config.json vocabulary: sizes, RMSNorm,
SwiGLU, RoPE (+ llama3/linear scaling) and the Mixtral/Qwen MoE keys. A family module calls these
and adds or refuses what is its own. Every field is read through `HFConfig` and every refusal is
an `HFImportError` naming the config.json field (`fail`), never a silent change of model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..hf_fields import HFConfig, HFImportError, fail
from ..text import shown
from .base import ModelFields

if TYPE_CHECKING:
    from ..schema import ModelConfig

#: config.json hidden_act -> model.activation (what the decoder families accept).
ACTIVATIONS: Mapping[str, str] = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
#: model.activation -> config.json hidden_act on export.
HF_ACTIVATIONS: Mapping[str, str] = {"silu": "silu", "gelu": "gelu", "relu": "relu"}
# Megatron-Core's llama3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def import_decoder(c: HFConfig, m: ModelFields, *, qkv_bias: bool = False, qk_norm: bool = False,
                   activations: Mapping[str, str] = ACTIVATIONS) -> None:
    """The shape, norm, MLP and embedding fields every decoder config.json has; refuses the biases
    Megatron cannot reproduce (`qkv_bias`: the family has q/k/v biases, as Qwen2)."""
    hidden, heads = c.integer("hidden_size"), c.integer("num_attention_heads")
    head_dim = c.integer("head_dim", None)
    if hidden % heads and head_dim is None:
        raise fail("num_attention_heads", f"hidden_size {hidden} is not divisible by {heads} heads",
                   hint="config.json needs head_dim when the heads do not divide hidden_size")
    m.put("num_layers", c.integer("num_hidden_layers"), "num_hidden_layers")
    m.put("hidden_size", hidden, "hidden_size")
    m.put("ffn_hidden_size", c.integer("intermediate_size"), "intermediate_size")
    m.put("num_attention_heads", heads, "num_attention_heads")
    m.put("num_query_groups", c.integer("num_key_value_heads", heads), "num_key_value_heads")
    m.put("kv_channels", head_dim or hidden // heads, "head_dim" if head_dim else "hidden_size")
    m.put("vocab_size", c.integer("vocab_size"), "vocab_size")
    m.put("normalization", "RMSNorm")
    m.put("norm_epsilon", c.number("rms_norm_eps", 1e-6), "rms_norm_eps")
    m.put("gated_linear_unit", True)
    m.put("position_embedding_type", "rope")
    m.put("share_embeddings_and_output_weights", c.flag("tie_word_embeddings"), "tie_word_embeddings")
    m.put("add_bias_linear", False)
    m.put("add_qkv_bias", qkv_bias)
    m.put("qk_layernorm", qk_norm)
    m.put("attention_dropout", c.number("attention_dropout", 0.0), "attention_dropout")
    act = c.text("hidden_act", "silu")
    if act not in activations:
        raise fail("hidden_act", f"hidden_act {shown(repr(act))} has no recipec equivalent",
                   hint=f"model.activation allows {sorted(set(activations.values()))}")
    m.put("activation", activations[act], "hidden_act")
    if c.has("max_position_embeddings"):
        m.put("max_position_embeddings", c.integer("max_position_embeddings"), "max_position_embeddings")
    partial = c.number("partial_rotary_factor", None)
    if partial is not None and partial != 1.0:
        m.put("rotary_percent", partial, "partial_rotary_factor")
    refuse_biases(c, qkv_bias=qkv_bias)


def refuse_biases(c: HFConfig, *, qkv_bias: bool = False) -> None:
    """Biases Megatron cannot reproduce: an error, never a silent change of model."""
    # Qwen2 has q/k/v bias (add_qkv_bias); Llama/Mistral/Qwen3 `attention_bias` also biases o_proj,
    # and `mlp_bias` the MLP, which Megatron has no switch for on its own.
    if c.flag("attention_bias") and not qkv_bias:
        raise fail("attention_bias", "attention_bias = true (q/k/v/o biases) cannot be expressed: Megatron has "
                   "add_qkv_bias (q/k/v only) and add_bias_linear (every linear layer, MLP included)")
    if c.flag("mlp_bias"):
        raise fail("mlp_bias", "mlp_bias = true (MLP-only biases) cannot be expressed in recipec")


def refuse_window(c: HFConfig, *, switch: str | None = None) -> None:
    """A family without sliding-window support: a window in config.json is an error. `switch` is the
    flag that turns the window on (Qwen: use_sliding_window); without one, a sliding_window value does."""
    window = c.integer("sliding_window", None, min=0)
    if switch is not None:
        enabled, field = c.flag(switch) and window is not None, switch
    else:
        enabled, field = window is not None, "sliding_window"
    if enabled:
        raise fail(field, f"sliding-window attention ({field} = {shown(repr(c.data.get(field)))}, window {window}) "
                   "cannot be expressed for this family", hint="set it to null/false "
                   "only if the model was trained without a window")
    layer_types = c.texts("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise fail("layer_types", f"layer_types {shown(repr(sorted(set(layer_types))))} include non-full attention")


def rope_parameters(c: HFConfig) -> tuple[float, HFConfig | None, str]:
    """(theta, scaling sub-object or None, the field theta came from), transformers 4.x or 5.x."""
    params = c.table("rope_parameters")
    if params is not None:  # transformers 5
        theta = params.number("rope_theta", c.number("rope_theta", 10000.0))
        kind = params.text("rope_type", params.text("type", "default"))
        return theta, (None if kind == "default" else params), "rope_parameters.rope_theta"
    scaling = c.table("rope_scaling")
    return c.number("rope_theta", 10000.0), (scaling if scaling and scaling.data else None), "rope_theta"


def import_rope(c: HFConfig, m: ModelFields, *, yarn: bool = False) -> None:
    """rotary_base and the RoPE scaling (llama3, linear; YaRN where the family passes `yarn`)."""
    theta, scaling, theta_field = rope_parameters(c)
    m.put("rotary_base", theta, theta_field)
    if scaling is None:
        return
    where = scaling.prefix
    kind = scaling.text("rope_type", scaling.text("type", None))
    if kind == "llama3":
        for key, want in _LLAMA3_FIXED.items():
            value = scaling.number(key, want)
            if value != want:
                raise fail(f"{where}{key}", f"llama3 RoPE scaling with {key} = {value} (Megatron-Core fixes it at {want})")
        orig = scaling.integer("original_max_position_embeddings", 8192)
        if orig != 8192:
            raise fail(f"{where}original_max_position_embeddings", f"llama3 RoPE scaling with "
                       f"original_max_position_embeddings = {orig} (Megatron-Core fixes it at 8192)")
        m.put("rope_scaling", "llama3", f"{where}rope_type")
        m.put("rope_scaling_factor", scaling.number("factor"), f"{where}factor")
        m.put("rope_original_max_position_embeddings", orig, f"{where}original_max_position_embeddings")
    elif kind == "linear":
        m.put("rope_scaling", "linear", f"{where}rope_type")
        m.put("rope_scaling_factor", scaling.number("factor"), f"{where}factor")
    elif kind == "yarn" and yarn:
        m.put("rope_scaling", "yarn", f"{where}rope_type")
        m.put("rope_scaling_factor", scaling.number("factor"), f"{where}factor")
        m.put("rope_original_max_position_embeddings", scaling.integer("original_max_position_embeddings"),
              f"{where}original_max_position_embeddings")
        for key, field in (("rope_beta_fast", "beta_fast"), ("rope_beta_slow", "beta_slow"),
                           ("rope_mscale", "mscale"), ("rope_mscale_all_dim", "mscale_all_dim")):
            if scaling.has(field):
                m.put(key, scaling.number(field), f"{where}{field}")
    else:
        supported = "llama3, linear" + (", yarn" if yarn else "")
        raise fail(f"{where}rope_type", f"RoPE scaling type {shown(repr(kind))} is not supported by the recipec "
                   "runtime", hint=f"supported: {supported}")


def import_moe(c: HFConfig, m: ModelFields, *, expert_size_field: str | None = None) -> None:
    """The router and experts of a Mixtral/Qwen-style MoE; `expert_size_field` names the experts' own
    inner size (Qwen: moe_intermediate_size), else the experts are intermediate_size wide (Mixtral)."""
    experts_field = "num_local_experts" if c.has("num_local_experts") else "num_experts"
    experts = c.integer(experts_field, None)
    if not experts:
        raise fail("num_local_experts", "an MoE config without num_local_experts/num_experts")
    m.put("num_moe_experts", experts, experts_field)
    m.put("moe_router_topk", c.integer("num_experts_per_tok"), "num_experts_per_tok")
    m.put("moe_aux_loss_coeff", c.number("router_aux_loss_coef", 0.001), "router_aux_loss_coef")
    m.put("moe_router_load_balancing_type", "aux_loss")
    if expert_size_field is not None:
        m.put("moe_ffn_hidden_size", c.integer(expert_size_field), expert_size_field)
    else:
        m.put("moe_ffn_hidden_size", m["ffn_hidden_size"], "intermediate_size")


def refuse_moe_extras(c: HFConfig) -> None:
    """Router noise and shared experts, which the Mixtral/Qwen MoE mapping does not express."""
    if c.number("router_jitter_noise", 0.0) != 0.0:
        raise fail("router_jitter_noise", "router_jitter_noise cannot be expressed in recipec")
    if c.integer("shared_expert_intermediate_size", 0, min=0):
        raise fail("shared_expert_intermediate_size", "shared experts are not mapped for this architecture")


def export_decoder(model: ModelConfig, cfg: dict[str, Any], *, qkv_bias: bool = False, qk_norm: bool = False,
                   activations: Mapping[str, str] = HF_ACTIVATIONS) -> None:
    """The shared config.json keys of a decoder (cfg already holds model_type); raises HFImportError when
    the recipe's model is not what the HF class computes."""
    model_type = cfg["model_type"]
    if model.normalization != "RMSNorm" or not model.gated_linear_unit or model.position_embedding_type != "rope":
        raise HFImportError(f"{model_type} export needs RMSNorm, a gated MLP and RoPE")
    if model.add_bias_linear or model.add_qkv_bias != qkv_bias or model.qk_layernorm != qk_norm:
        raise HFImportError(f"{model_type} export: add_bias_linear/add_qkv_bias/qk_layernorm do not match the "
                            "Hugging Face architecture")
    act = activations.get(model.activation)
    if act is None:
        raise HFImportError(f"activation {model.activation!r} has no Hugging Face name")
    cfg.update(decoder_keys(model, hidden_act=act))


def decoder_keys(model: ModelConfig, *, hidden_act: str, intermediate_size: int | None = None) -> dict[str, Any]:
    """The config.json keys every decoder shares, without checks (export_decoder's; GPT-OSS checks its own
    biases and activation). `intermediate_size` defaults to the dense MLP's (GPT-OSS: the experts')."""
    return {
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size if intermediate_size is None else intermediate_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "hidden_act": hidden_act,
        "rope_theta": model.rotary_base,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
    }


def export_rope(model: ModelConfig, cfg: dict[str, Any], *, yarn: bool = False) -> None:
    """partial_rotary_factor and rope_scaling (4.x spelling, which 5.x also reads)."""
    if model.rotary_percent != 1.0:
        cfg["partial_rotary_factor"] = model.rotary_percent
    if model.rope_scaling == "llama3":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": model.rope_original_max_position_embeddings}
    elif model.rope_scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    elif model.rope_scaling == "yarn" and yarn:
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                               "original_max_position_embeddings": model.rope_original_max_position_embeddings,
                               "beta_fast": model.rope_beta_fast, "beta_slow": model.rope_beta_slow,
                               "mscale": model.rope_mscale, "mscale_all_dim": model.rope_mscale_all_dim}
    elif model.rope_scaling is not None:
        raise HFImportError(f"rope_scaling {model.rope_scaling!r} has no Hugging Face export mapping")


def export_moe(model: ModelConfig, cfg: dict[str, Any]) -> None:
    """num_local_experts & co. of a Mixtral/Qwen-style MoE (a dense recipe is an HFImportError)."""
    if not model.is_moe:
        raise HFImportError(f"{cfg['model_type']} export needs model.num_moe_experts")
    cfg.update(num_local_experts=model.num_moe_experts, num_experts=model.num_moe_experts,
               num_experts_per_tok=model.moe_router_topk, router_aux_loss_coef=model.moe_aux_loss_coeff,
               output_router_logits=False)


def refuse_moe(model: ModelConfig, cfg: dict[str, Any]) -> None:
    """A dense family's export of a recipe with experts: an HFImportError."""
    if model.is_moe:
        raise HFImportError(f"{cfg['model_type']} is dense but the recipe has num_moe_experts")
