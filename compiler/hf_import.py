"""`recipec import-hf`: a Hugging Face config.json becomes a TOML recipe (and back).

Pure Python (json only): no torch, no transformers. The reverse direction,
`hf_config(model)`, is what `recipec convert mcore-to-hf` writes as config.json.

Every architecture field of the HF config is either mapped onto `[model]` or,
when recipec cannot express it (sliding-window attention, a RoPE scaling type
the runtime lacks, attention/MLP biases Megatron cannot reproduce, an unknown
model_type ...), rejected with an `HFImportError` that names the HF field.
Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`)
spellings are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError
from .render import toml_value


class HFImportError(RecipeError):
    """A Hugging Face config that recipec cannot express (or cannot read)."""


# One row per supported HF model_type: the recipec family, the bundled family base,
# the HF class written back on export, and which optional pieces the family has.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(architecture="llama", base="_base/llama2", hf_class="LlamaForCausalLM"),
    "mistral": dict(architecture="mistral", base="_base/mistral", hf_class="MistralForCausalLM"),
    "qwen2": dict(architecture="qwen2", base="_base/qwen25", hf_class="Qwen2ForCausalLM", qkv_bias=True),
    "qwen3": dict(architecture="qwen3", base="_base/qwen3", hf_class="Qwen3ForCausalLM", qk_norm=True),
    "mixtral": dict(architecture="mixtral", base="_base/mixtral", hf_class="MixtralForCausalLM", moe=True),
    "qwen3_moe": dict(architecture="qwen3_moe", base="_base/qwen3_moe", hf_class="Qwen3MoeForCausalLM",
                      qk_norm=True, moe=True),
}
_BY_FAMILY = {row["architecture"]: mt for mt, row in ARCHITECTURES.items()}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# Megatron-Core's llama3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _fail(field: str, message: str, hint: str | None = None) -> HFImportError:
    return HFImportError([Problem(HFImportError, message, key=f"config.json:{field}", hint=hint)])


def read_hf_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed config.json of a local HF model directory (or of the file itself)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise HFImportError([Problem(HFImportError, f"no config.json at {file}", key=str(p),
                                     hint="pass a local Hugging Face model directory (nothing is downloaded)")])
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise HFImportError([Problem(HFImportError, f"{file} is not readable JSON ({exc})", key=str(file))]) from None
    if not isinstance(data, dict):
        raise HFImportError([Problem(HFImportError, f"{file} does not hold a JSON object", key=str(file))])
    return data, file.parent


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, str]:
    """(theta, scaling dict or None, name of the field the scaling came from)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), (None if kind == "default" else params), "rope_parameters"
    scaling = cfg.get("rope_scaling")
    return float(cfg.get("rope_theta", 10000.0)), scaling or None, "rope_scaling"


def model_fields(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`[model]` values, the arch row) for an HF config; raises HFImportError naming the field."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _fail("model_type", f"model_type {model_type!r} has no recipec mapping",
                    hint=f"supported: {', '.join(sorted(ARCHITECTURES))}")
    row = ARCHITECTURES[model_type]

    def need(name: str, *alts: str) -> Any:
        for key in (name, *alts):
            if cfg.get(key) is not None:
                return cfg[key]
        raise _fail(name, f"{name} is missing from config.json")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    m: dict[str, Any] = {
        "architecture": row["architecture"],
        "num_layers": int(need("num_hidden_layers")),
        "hidden_size": hidden,
        "ffn_hidden_size": int(need("intermediate_size")),
        "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_key_value_heads") or heads),
        "kv_channels": int(cfg.get("head_dim") or hidden // heads),
        "vocab_size": int(need("vocab_size")),
        "normalization": "RMSNorm",
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        "add_bias_linear": False,
        "add_qkv_bias": bool(row.get("qkv_bias", False)),
        "qk_layernorm": bool(row.get("qk_norm", False)),
        "attention_dropout": float(cfg.get("attention_dropout", 0.0) or 0.0),
    }
    act = cfg.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise _fail("hidden_act", f"hidden_act {act!r} has no recipec equivalent",
                    hint=f"model.activation allows {sorted(set(_ACTIVATIONS.values()))}")
    m["activation"] = _ACTIVATIONS[act]
    if hidden % heads and not cfg.get("head_dim"):
        raise _fail("num_attention_heads", f"hidden_size {hidden} is not divisible by {heads} heads")
    if cfg.get("max_position_embeddings"):
        m["max_position_embeddings"] = int(cfg["max_position_embeddings"])
    partial = cfg.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        m["rotary_percent"] = float(partial)

    # Attention biases: Qwen2 has q/k/v bias (add_qkv_bias); Llama/Mistral/Qwen3 `attention_bias`
    # also biases o_proj, and `mlp_bias` the MLP, which Megatron has no switch for on its own.
    if cfg.get("attention_bias") and not row.get("qkv_bias"):
        raise _fail("attention_bias", "attention_bias = true (q/k/v/o biases) cannot be expressed: Megatron has "
                    "add_qkv_bias (q/k/v only) and add_bias_linear (every linear layer, MLP included)")
    if cfg.get("mlp_bias"):
        raise _fail("mlp_bias", "mlp_bias = true (MLP-only biases) cannot be expressed in recipec")

    # Sliding-window attention.
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        enabled = bool(cfg.get("use_sliding_window")) and window is not None
        field = "use_sliding_window"
    else:
        enabled, field = window is not None, "sliding_window"
    if enabled:
        raise _fail(field, f"sliding-window attention ({field} = {cfg.get(field)!r}, window {window}) "
                    "cannot be expressed: recipec has no sliding-window field", hint="set it to null/false "
                    "only if the model was trained without a window")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _fail("layer_types", f"layer_types {sorted(set(layer_types))} include non-full attention")

    # RoPE.
    theta, scaling, rope_field = _rope(cfg)
    m["rotary_base"] = theta
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            for key, want in _LLAMA3_FIXED.items():
                if key in scaling and float(scaling[key]) != want:
                    raise _fail(f"{rope_field}.{key}", f"llama3 RoPE scaling with {key} = {scaling[key]} "
                                f"(Megatron-Core fixes it at {want})")
            orig = int(scaling.get("original_max_position_embeddings", 8192))
            if orig != 8192:
                raise _fail(f"{rope_field}.original_max_position_embeddings",
                            f"llama3 RoPE scaling with original_max_position_embeddings = {orig} "
                            "(Megatron-Core fixes it at 8192)")
            m.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                     rope_original_max_position_embeddings=orig)
        elif kind == "linear":
            m.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
        else:
            raise _fail(f"{rope_field}.rope_type", f"RoPE scaling type {kind!r} is not supported by the recipec "
                        "runtime", hint="supported: llama3, linear")

    if row.get("moe"):
        experts = cfg.get("num_local_experts") or cfg.get("num_experts")
        if not experts:
            raise _fail("num_local_experts", "an MoE config without num_local_experts/num_experts")
        m.update(num_moe_experts=int(experts), moe_router_topk=int(need("num_experts_per_tok")),
                 moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.001)),
                 moe_router_load_balancing_type="aux_loss")
        if model_type == "qwen3_moe":
            m["moe_ffn_hidden_size"] = int(need("moe_intermediate_size"))
            if not cfg.get("norm_topk_prob", False):
                raise _fail("norm_topk_prob", "norm_topk_prob = false (top-k router probabilities not "
                            "renormalized) cannot be expressed: recipec's router renormalizes")
            if cfg.get("mlp_only_layers"):
                raise _fail("mlp_only_layers", "dense layers mixed into an MoE model (mlp_only_layers) "
                            "cannot be expressed")
            if int(cfg.get("decoder_sparse_step", 1)) != 1:
                raise _fail("decoder_sparse_step", "decoder_sparse_step != 1 (not every layer MoE) "
                            "cannot be expressed")
        else:
            m["moe_ffn_hidden_size"] = m["ffn_hidden_size"]
        if float(cfg.get("router_jitter_noise", 0.0) or 0.0) != 0.0:
            raise _fail("router_jitter_noise", "router_jitter_noise cannot be expressed in recipec")
        if cfg.get("shared_expert_intermediate_size"):
            raise _fail("shared_expert_intermediate_size", "shared experts are not mapped for this architecture")
    return m, row


def _family_base(model_type: str, m: dict[str, Any]) -> str:
    if model_type == "llama":
        if m.get("rope_scaling") == "llama3":
            return "_base/llama32" if m["share_embeddings_and_output_weights"] else "_base/llama31"
        return "_base/llama3" if m["rotary_base"] >= 500000 else "_base/llama2"
    return ARCHITECTURES[model_type]["base"]


def tokenizer_files(directory: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


def recipe_from_hf(path: str | Path, *, base: str = "pretrain", name: str | None = None) -> str:
    """TOML recipe text for the HF model at `path` (a directory or its config.json)."""
    if base not in ("pretrain", "finetune"):
        raise HFImportError(f"unknown base {base!r}; use pretrain or finetune")
    cfg, directory = read_hf_config(path)
    m, row = model_fields(cfg)
    family = _family_base(cfg["model_type"], m)
    directory = directory.resolve()
    toks = tokenizer_files(directory)
    if base == "pretrain":
        extends = ["_base/pretrain", family]
    else:  # the finetune base goes after the model (see _base/finetune.toml)
        extends = [family, "_base/finetune"]
    seq = min(4096, m.get("max_position_embeddings", 4096))
    lines = [
        f"# Imported by `recipec import-hf` from {directory / 'config.json'}",
        f"# (model_type {cfg['model_type']!r}, {cfg.get('architectures', ['?'])[0]}).",
        "# Every [model] field below comes from that config.json; the rest from the bases.",
        f"extends = [{', '.join(toml_value(e) for e in extends)}]",
    ]
    if name:
        lines.append(f"name = {toml_value(name)}")
    lines += ["", "[model]"]
    m.setdefault("seq_length", seq)
    for key, value in m.items():
        lines.append(f"{key} = {toml_value(value)}")
    if toks:
        lines += ["", f"# tokenizer files found: {', '.join(toks)}", "[tokenizer]",
                  'type = "huggingface"', f"path = {toml_value(str(directory))}"]
    if base == "finetune":
        lines += ["", "[checkpoint]", f"pretrained = {toml_value(str(directory))}"]
    return "\n".join(lines) + "\n"


def hf_config(model: Any, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json (transformers 4.x/5.x readable) for a derived recipec ModelConfig."""
    model_type = _BY_FAMILY.get(model.architecture)
    if model_type is None:
        raise HFImportError(f"model.architecture {model.architecture!r} has no Hugging Face export mapping")
    row = ARCHITECTURES[model_type]
    if model.normalization != "RMSNorm" or not model.gated_linear_unit or model.position_embedding_type != "rope":
        raise HFImportError(f"{model_type} export needs RMSNorm, a gated MLP and RoPE")
    if model.add_bias_linear or model.add_qkv_bias != bool(row.get("qkv_bias")) \
            or model.qk_layernorm != bool(row.get("qk_norm")):
        raise HFImportError(f"{model_type} export: add_bias_linear/add_qkv_bias/qk_layernorm do not match the "
                            "Hugging Face architecture")
    act = {"silu": "silu", "gelu": "gelu", "relu": "relu"}.get(model.activation)
    if act is None:
        raise HFImportError(f"activation {model.activation!r} has no Hugging Face name")
    cfg: dict[str, Any] = {
        "architectures": [row["hf_class"]],
        "model_type": model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "hidden_act": act,
        "rope_theta": model.rotary_base,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model_type in ("llama", "mistral"):
        cfg.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral" or model_type == "mixtral":
        cfg["sliding_window"] = None
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if model_type in ("qwen3", "qwen3_moe"):
        cfg["attention_bias"] = False
    if model.rotary_percent != 1.0:
        cfg["partial_rotary_factor"] = model.rotary_percent
    if model.rope_scaling == "llama3":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": model.rope_original_max_position_embeddings}
    elif model.rope_scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    elif model.rope_scaling is not None:
        raise HFImportError(f"rope_scaling {model.rope_scaling!r} has no Hugging Face export mapping")
    if row.get("moe"):
        if not model.is_moe:
            raise HFImportError(f"{model_type} export needs model.num_moe_experts")
        cfg.update(num_local_experts=model.num_moe_experts, num_experts=model.num_moe_experts,
                   num_experts_per_tok=model.moe_router_topk, router_aux_loss_coef=model.moe_aux_loss_coeff,
                   output_router_logits=False)
        if model_type == "qwen3_moe":
            cfg.update(moe_intermediate_size=model.moe_ffn_hidden_size, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[])
        elif model.moe_ffn_hidden_size != model.ffn_hidden_size:
            raise HFImportError("mixtral export needs moe_ffn_hidden_size == ffn_hidden_size")
    elif model.is_moe:
        raise HFImportError(f"{model_type} is dense but the recipe has num_moe_experts")
    return cfg
