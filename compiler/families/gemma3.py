"""Gemma 3 text models (google/gemma-3-1b, and the text towers of -4b/-12b/-27b): model_type "gemma3_text".

What makes it its own family, and the [model] field each maps onto:
- alternating attention: 5 sliding-window layers, then one global (HF `layer_types`, or the older
  `sliding_window_pattern = 6`) -> `window_size = sliding_window - 1` (HF counts the query itself,
  Megatron the keys to its left; Megatron-Bridge maps it the same way) + `window_attn_skip_freq = 6`;
- a separate RoPE theta on the sliding layers (HF `rope_local_base_freq`, or transformers 5's
  `rope_parameters.sliding_attention.rope_theta`: 10000) -> `rotary_base_local`; the global layers
  keep `rotary_base` (1e6) and the linear RoPE scaling (4B/12B/27B: factor 8) -> `rope_scaling`;
- per-head q/k RMSNorm (`qk_layernorm`), sandwich norms (`sandwich_norm`: pre- and post-norm around
  attention and MLP), every norm zero-centred, applied as (1 + w) (`layernorm_zero_centered_gamma`);
- token embeddings times sqrt(hidden_size) (`scale_embeddings`);
- attention logits scaled by `query_pre_attn_scalar ** -0.5` (27B: 168, not head_dim 128) -> `softmax_scale`;
- GeGLU with GELU's tanh approximation (HF `hidden_activation = "gelu_pytorch_tanh"`) -> `gelu_tanh`;
- a tied 262k vocabulary.
Logit soft-capping (`final_logit_softcapping`, `attn_logit_softcapping`: Gemma 2's, null in every
Gemma 3 config) and bidirectional attention (EmbeddingGemma) are refused, never dropped. The
multimodal model_type "gemma3" (Gemma3ForConditionalGeneration: its text config nested in
`text_config`, its weights under `model.language_model.`) is refused with a hint.
The runtime half (layer spec, weights) is runtime/families/gemma3.py.
"""

from __future__ import annotations

import math
from typing import Any

from ..hf_fields import HFConfig, HFImportError, fail
from ..schema import ModelConfig
from ..text import shown
from . import _decoder as d
from .base import Family, FamilyProblem, ModelFields

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' Gemma3TextConfig defaults, used when config.json leaves a field out.
DEFAULTS = {"head_dim": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "max_position_embeddings": 131_072, "hidden_activation": "gelu_pytorch_tanh"}
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class _AnyActivation(dict[str, str]):
    """Any hidden_act passes import_decoder: Gemma3MLP never reads it (hidden_activation is mapped after)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "gelu_tanh"


_ANY_ACTIVATION = _AnyActivation()


def layer_pattern(num_layers: int, skip_freq: int | None) -> list[str]:
    """HF layer_types of a windowed model: Megatron windows layer n (1-based) unless n % skip_freq == 0."""
    return [FULL if skip_freq is not None and (i + 1) % skip_freq == 0 else SLIDING for i in range(num_layers)]


def _import(c: HFConfig, m: ModelFields) -> None:
    if c.text("model_type") == "gemma3":
        raise fail("model_type", 'model_type "gemma3" is the multimodal Gemma3ForConditionalGeneration (vision '
                   "tower, weights under model.language_model.*); recipec imports the text model only",
                   hint='save the language model as a Gemma3ForCausalLM (model_type "gemma3_text"), e.g. '
                   "google/gemma-3-1b-pt, or a text-only export of the 4B/12B/27B checkpoints")
    # hidden_act, where a config.json has it, is ignored by transformers: hidden_activation (below) counts.
    d.import_decoder(c, m, qk_norm=True, activations=_ANY_ACTIVATION)
    m.put("num_query_groups", c.integer("num_key_value_heads", DEFAULTS["num_key_value_heads"]),
          "num_key_value_heads")
    head_dim = c.integer("head_dim", DEFAULTS["head_dim"])
    m.put("kv_channels", head_dim, "head_dim")
    m.put("share_embeddings_and_output_weights", c.flag("tie_word_embeddings", True), "tie_word_embeddings")
    m.put("max_position_embeddings", c.integer("max_position_embeddings", DEFAULTS["max_position_embeddings"]),
          "max_position_embeddings")
    # Gemma3MLP reads hidden_activation (hidden_act, where present, is ignored by transformers).
    act = c.text("hidden_activation", DEFAULTS["hidden_activation"])
    if act not in _ACTIVATIONS:
        raise fail("hidden_activation", f"hidden_activation {shown(repr(act))} has no recipec equivalent",
                   hint=f"supported: {', '.join(sorted(_ACTIVATIONS))}")
    m.put("activation", _ACTIVATIONS[act], "hidden_activation")
    m.put("layernorm_zero_centered_gamma", True)
    m.put("sandwich_norm", True)
    m.put("scale_embeddings", True)
    scalar = c.number("query_pre_attn_scalar", float(DEFAULTS["query_pre_attn_scalar"]), min=1e-6)
    if scalar != head_dim:
        m.put("softmax_scale", scalar ** -0.5, "query_pre_attn_scalar")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.has(field):
            raise fail(field, f"{field} = {shown(repr(c.data[field]))}: logit soft-capping (Gemma 2) cannot be "
                       "expressed in recipec", hint="Gemma 3 has none: set it to null only if the model was "
                       "trained without it")
    if c.flag("use_bidirectional_attention"):
        raise fail("use_bidirectional_attention", "bidirectional attention (EmbeddingGemma) cannot be expressed: "
                   "recipec trains causal decoders")
    _import_window(c, m, m["num_layers"])
    _import_rope(c, m)


def _import_window(c: HFConfig, m: ModelFields, num_layers: int) -> None:
    """sliding_window + layer_types (or sliding_window_pattern) -> window_size + window_attn_skip_freq."""
    types = c.texts("layer_types")
    if types is None:  # transformers 4.x configs: every Nth layer global
        types = layer_pattern(num_layers, c.integer("sliding_window_pattern", DEFAULTS["sliding_window_pattern"]))
    if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise fail("layer_types", f"layer_types must list {num_layers} entries of {SLIDING!r}/{FULL!r}, got "
                   f"{shown(repr(types), 120)}")
    if SLIDING not in types:
        return
    if "sliding_window" in c.data and c.data["sliding_window"] is None:
        raise fail("sliding_window", "sliding_window is null but layer_types has sliding layers",
                   hint="give the window (Gemma 3: 512 for 1B, 1024 for 4B/12B/27B) or make every layer full_attention")
    window = c.integer("sliding_window", DEFAULTS["sliding_window"], min=2)
    freq = None if FULL not in types else types.index(FULL) + 1
    if types != layer_pattern(num_layers, freq):
        raise fail("layer_types", f"layer_types {shown(repr(types), 120)} is not periodic (full attention on every "
                   "Nth layer, sliding elsewhere), which is what Megatron's window_attn_skip_freq expresses")
    m.put("window_size", window - 1, "sliding_window")
    if freq is not None:
        m.put("window_attn_skip_freq", freq, "layer_types")


def _import_rope(c: HFConfig, m: ModelFields) -> None:
    """Global theta + linear scaling, and the local theta: transformers 5's per-layer-type
    rope_parameters, or 4.x's rope_theta / rope_scaling / rope_local_base_freq."""
    params = c.table("rope_parameters")
    if params is not None:
        full, local = params.table(FULL), params.table(SLIDING)
        if full is None and local is None:
            raise fail("rope_parameters", "Gemma 3's rope_parameters must hold full_attention/sliding_attention "
                       "entries (transformers 5 writes one per layer type)")
        global_theta = full.number("rope_theta", DEFAULTS["rope_theta"]) if full else DEFAULTS["rope_theta"]
        theta_field = f"{full.prefix}rope_theta" if full else "rope_parameters"
        scaling = full if full is not None and full.text("rope_type", "default") != "default" else None
        local_theta = local.number("rope_theta", DEFAULTS["rope_local_base_freq"]) if local \
            else DEFAULTS["rope_local_base_freq"]
        local_field = f"{local.prefix}rope_theta" if local else "rope_parameters"
        if local is not None and local.text("rope_type", "default") != "default":
            raise fail(f"{local.prefix}rope_type", f"RoPE scaling on the sliding-window layers "
                       f"({shown(repr(local.data.get('rope_type')))}) cannot be expressed: recipec scales the "
                       "global layers' RoPE only")
    else:
        global_theta, theta_field = c.number("rope_theta", DEFAULTS["rope_theta"]), "rope_theta"
        table = c.table("rope_scaling")
        scaling = table if table is not None and table.data else None
        local_theta = c.number("rope_local_base_freq", DEFAULTS["rope_local_base_freq"])
        local_field = "rope_local_base_freq"
    m.put("rotary_base", global_theta, theta_field)
    m.put("rotary_base_local", local_theta, local_field)
    if scaling is None:
        return
    kind = scaling.text("rope_type", scaling.text("type", None))
    if kind != "linear":
        raise fail(f"{scaling.prefix}rope_type", f"RoPE scaling type {shown(repr(kind))} on Gemma 3's global "
                   "layers is not supported by the recipec runtime", hint="Gemma 3 uses linear (factor 8)")
    m.put("rope_scaling", "linear", f"{scaling.prefix}rope_type")
    m.put("rope_scaling_factor", scaling.number("factor"), f"{scaling.prefix}factor")


def query_pre_attn_scalar(model: ModelConfig) -> float | int:
    """HF query_pre_attn_scalar of a recipe: softmax_scale ** -2 (an integer when it is one), else head_dim."""
    if model.softmax_scale is None:
        return int(model.kv_channels or 0)
    value = 1.0 / model.softmax_scale ** 2
    return round(value) if math.isclose(value, round(value), rel_tol=1e-12, abs_tol=1e-9) else value


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    problems = list(_validate(model))
    if not (model.layernorm_zero_centered_gamma and model.scale_embeddings):
        problems.append(FamilyProblem("model.layernorm_zero_centered_gamma", "Gemma3ForCausalLM needs "
                                      "layernorm_zero_centered_gamma = true and scale_embeddings = true"))
    if problems:
        raise HFImportError("gemma3_text export: " + "; ".join(f"{p.key}: {p.message}" for p in problems))
    d.export_decoder(model, cfg, qk_norm=True, activations={"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"})
    d.refuse_moe(model, cfg)
    cfg["hidden_activation"] = cfg.pop("hidden_act")
    layers = layer_pattern(model.num_layers, model.window_attn_skip_freq) if model.window_size else \
        [FULL] * model.num_layers
    cfg.update(
        query_pre_attn_scalar=query_pre_attn_scalar(model),
        # Without windows every layer is full_attention and the value unused: transformers' default.
        sliding_window=model.window_size + 1 if model.window_size else DEFAULTS["sliding_window"],
        layer_types=layers,
        # transformers 4.x (before layer_types) reads the pattern; 0 layers windowed is every layer global.
        sliding_window_pattern=model.window_attn_skip_freq or (model.num_layers + 1 if model.window_size else 1),
        rope_local_base_freq=model.rotary_base_local if model.rotary_base_local is not None else model.rotary_base,
        final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
        use_bidirectional_attention=False,
    )
    if model.rope_scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    elif model.rope_scaling is not None:
        raise HFImportError(f"rope_scaling {model.rope_scaling!r}: Gemma 3 export knows linear scaling only")


def _validate(model: ModelConfig) -> list[FamilyProblem]:
    """What the gemma3 layer spec cannot build (runtime/families/gemma3_layers.py)."""
    problems = []
    fix = "a gemma3 recipe keeps the _base/gemma3 value"
    for key, bad, what in (
        ("normalization", model.normalization != "RMSNorm", "Gemma's norms are RMSNorm"),
        ("position_embedding_type", model.position_embedding_type != "rope", "Gemma 3 uses RoPE"),
        ("sandwich_norm", not model.sandwich_norm, "the gemma3 layer always has the sandwich norms"),
        ("add_bias_linear", model.add_bias_linear, "the sandwich norm would come after the bias"),
        ("add_qkv_bias", model.add_qkv_bias, "Gemma 3 has no q/k/v biases"),
        ("num_moe_experts", model.is_moe, "Gemma 3 is dense"),
        ("multi_latent_attention", model.multi_latent_attention, "Gemma 3 uses standard attention"),
        ("gated_linear_unit", not model.gated_linear_unit, "Gemma 3's MLP is gated (GeGLU)"),
    ):
        if bad:
            problems.append(FamilyProblem(f"model.{key}", f"{what}: model.architecture = \"gemma3\" cannot build "
                                          f"model.{key} = {getattr(model, key)!r}", fix))
    if model.rope_scaling not in (None, "linear"):
        problems.append(FamilyProblem("model.rope_scaling", f"rope_scaling = {model.rope_scaling!r}: the gemma3 "
                                      "family scales the global layers' RoPE linearly only", 'use "linear" or unset it'))
    return problems


FAMILIES = (
    Family(name="gemma3", summary="Gemma 3 (text): 5 sliding-window : 1 global layers with a local RoPE theta, "
           "qk-norm, sandwich (1 + w) RMSNorms, sqrt(hidden)-scaled tied embeddings, GeGLU",
           hf_model_types=("gemma3_text", "gemma3"), hf_class="Gemma3ForCausalLM", base="_base/gemma3",
           import_hf=_import, export_hf=_export, validate=_validate),
)
