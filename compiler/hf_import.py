"""`recipec import-hf`: a Hugging Face config.json becomes a TOML recipe (and back).

Pure Python (json only): no torch, no transformers. The reverse direction,
`hf_config(model)`, is what `recipec convert mcore-to-hf` writes as config.json.

Every architecture field of the HF config is either mapped onto `[model]` or,
when recipec cannot express it (sliding-window attention, a RoPE scaling type
the runtime lacks, attention/MLP biases Megatron cannot reproduce, an unknown
model_type ...), rejected with an `HFImportError` that names the HF field.
Both transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`) spellings are read.

The weights' dtype becomes `precision.dtype` (float32 -> fp32, bfloat16 -> bf16, float16 -> fp16;
a config.json without one means float32, as transformers loads it), so `recipec convert
hf-to-mcore` and `mcore-to-hf` with the imported recipe give back the same bits. Any other
value is an HFImportError naming the field.

config.json is data from anywhere: every field is read through `HFConfig` (typed,
finite, in range), the recipe is written only through the TOML writer (values
escaped, comments on one line), and the result is compiled before it is returned,
so import-hf gives a recipe that builds or an HFImportError naming the field.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError
from .hf_fields import HFConfig, HFImportError, fail, read_hf_config
from .render import toml_document
from .schema import ModelConfig
from .schema._fields import check_value
from .text import shown

__all__ = ["ARCHITECTURES", "HF_DTYPES", "HFImportError", "hf_config", "model_fields", "precision_dtype",
           "read_hf_config", "recipe_from_hf", "tokenizer_files"]

# One row per supported HF model_type: the recipec family, the bundled family base,
# the HF class written back on export, and which optional pieces the family has.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"architecture": "llama", "base": "_base/llama2", "hf_class": "LlamaForCausalLM"},
    "mistral": {"architecture": "mistral", "base": "_base/mistral", "hf_class": "MistralForCausalLM"},
    "qwen2": {"architecture": "qwen2", "base": "_base/qwen25", "hf_class": "Qwen2ForCausalLM", "qkv_bias": True},
    "qwen3": {"architecture": "qwen3", "base": "_base/qwen3", "hf_class": "Qwen3ForCausalLM", "qk_norm": True},
    "mixtral": {"architecture": "mixtral", "base": "_base/mixtral", "hf_class": "MixtralForCausalLM", "moe": True},
    "qwen3_moe": {"architecture": "qwen3_moe", "base": "_base/qwen3_moe", "hf_class": "Qwen3MoeForCausalLM",
                  "qk_norm": True, "moe": True},
}
_BY_FAMILY = {row["architecture"]: mt for mt, row in ARCHITECTURES.items()}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# config.json's dtype names (those transformers accepts: getattr(torch, name)) -> precision.dtype.
HF_DTYPES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# Megatron-Core's llama3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


class _Model(dict[str, Any]):
    """`[model]` values, each remembering the config.json field it came from (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def put(self, key: str, value: Any, field: str | None = None) -> None:
        self[key] = value
        if field is not None:
            self.fields[key] = field


def _rope(c: HFConfig) -> tuple[float, HFConfig | None, str]:
    """(theta, scaling sub-object or None, the field theta came from)."""
    params = c.table("rope_parameters")
    if params is not None:  # transformers 5
        theta = params.number("rope_theta", c.number("rope_theta", 10000.0))
        kind = params.text("rope_type", params.text("type", "default"))
        return theta, (None if kind == "default" else params), "rope_parameters.rope_theta"
    scaling = c.table("rope_scaling")
    return c.number("rope_theta", 10000.0), (scaling if scaling and scaling.data else None), "rope_theta"


def model_fields(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`[model]` values, the arch row) for an HF config; raises HFImportError naming the field."""
    m, row = _map(cfg)
    return dict(m), row


def _map(cfg: dict[str, Any]) -> tuple[_Model, dict[str, Any]]:
    c = HFConfig(cfg)
    model_type = c.text("model_type", None)
    if model_type not in ARCHITECTURES:
        raise fail("model_type", f"model_type {shown(repr(model_type))} has no recipec mapping",
                   hint=f"supported: {', '.join(sorted(ARCHITECTURES))}")
    row = ARCHITECTURES[model_type]
    m = _Model()
    hidden, heads = c.integer("hidden_size"), c.integer("num_attention_heads")
    head_dim = c.integer("head_dim", None)
    if hidden % heads and head_dim is None:
        raise fail("num_attention_heads", f"hidden_size {hidden} is not divisible by {heads} heads",
                   hint="config.json needs head_dim when the heads do not divide hidden_size")
    m.put("architecture", row["architecture"])
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
    m.put("add_qkv_bias", bool(row.get("qkv_bias", False)))
    m.put("qk_layernorm", bool(row.get("qk_norm", False)))
    m.put("attention_dropout", c.number("attention_dropout", 0.0), "attention_dropout")
    act = c.text("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise fail("hidden_act", f"hidden_act {shown(repr(act))} has no recipec equivalent",
                   hint=f"model.activation allows {sorted(set(_ACTIVATIONS.values()))}")
    m.put("activation", _ACTIVATIONS[act], "hidden_act")
    if c.has("max_position_embeddings"):
        m.put("max_position_embeddings", c.integer("max_position_embeddings"), "max_position_embeddings")
    partial = c.number("partial_rotary_factor", None)
    if partial is not None and partial != 1.0:
        m.put("rotary_percent", partial, "partial_rotary_factor")
    _refuse_unmappable(c, model_type, row)
    _map_rope(c, m)
    if row.get("moe"):
        _map_moe(c, m, model_type)
    _check_schema(m)
    return m, row


def _refuse_unmappable(c: HFConfig, model_type: str, row: dict[str, Any]) -> None:
    """Biases and sliding windows Megatron cannot reproduce: an error, never a silent change of model."""
    # Qwen2 has q/k/v bias (add_qkv_bias); Llama/Mistral/Qwen3 `attention_bias` also biases o_proj,
    # and `mlp_bias` the MLP, which Megatron has no switch for on its own.
    if c.flag("attention_bias") and not row.get("qkv_bias"):
        raise fail("attention_bias", "attention_bias = true (q/k/v/o biases) cannot be expressed: Megatron has "
                   "add_qkv_bias (q/k/v only) and add_bias_linear (every linear layer, MLP included)")
    if c.flag("mlp_bias"):
        raise fail("mlp_bias", "mlp_bias = true (MLP-only biases) cannot be expressed in recipec")
    window = c.integer("sliding_window", None, min=0)
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        enabled, field = c.flag("use_sliding_window") and window is not None, "use_sliding_window"
    else:
        enabled, field = window is not None, "sliding_window"
    if enabled:
        raise fail(field, f"sliding-window attention ({field} = {shown(repr(c.data.get(field)))}, window {window}) "
                   "cannot be expressed: recipec has no sliding-window field", hint="set it to null/false "
                   "only if the model was trained without a window")
    layer_types = c.texts("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise fail("layer_types", f"layer_types {shown(repr(sorted(set(layer_types))))} include non-full attention")


def _map_rope(c: HFConfig, m: _Model) -> None:
    theta, scaling, theta_field = _rope(c)
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
    else:
        raise fail(f"{where}rope_type", f"RoPE scaling type {shown(repr(kind))} is not supported by the recipec "
                   "runtime", hint="supported: llama3, linear")


def _map_moe(c: HFConfig, m: _Model, model_type: str) -> None:
    experts_field = "num_local_experts" if c.has("num_local_experts") else "num_experts"
    experts = c.integer(experts_field, None)
    if not experts:
        raise fail("num_local_experts", "an MoE config without num_local_experts/num_experts")
    m.put("num_moe_experts", experts, experts_field)
    m.put("moe_router_topk", c.integer("num_experts_per_tok"), "num_experts_per_tok")
    m.put("moe_aux_loss_coeff", c.number("router_aux_loss_coef", 0.001), "router_aux_loss_coef")
    m.put("moe_router_load_balancing_type", "aux_loss")
    if model_type == "qwen3_moe":
        m.put("moe_ffn_hidden_size", c.integer("moe_intermediate_size"), "moe_intermediate_size")
        if not c.flag("norm_topk_prob"):
            raise fail("norm_topk_prob", "norm_topk_prob = false (top-k router probabilities not "
                       "renormalized) cannot be expressed: recipec's router renormalizes")
        if c.array("mlp_only_layers"):
            raise fail("mlp_only_layers", "dense layers mixed into an MoE model (mlp_only_layers) cannot be expressed")
        if c.integer("decoder_sparse_step", 1) != 1:
            raise fail("decoder_sparse_step", "decoder_sparse_step != 1 (not every layer MoE) cannot be expressed")
    else:
        m.put("moe_ffn_hidden_size", m["ffn_hidden_size"], "intermediate_size")
    if c.number("router_jitter_noise", 0.0) != 0.0:
        raise fail("router_jitter_noise", "router_jitter_noise cannot be expressed in recipec")
    if c.integer("shared_expert_intermediate_size", 0, min=0):
        raise fail("shared_expert_intermediate_size", "shared experts are not mapped for this architecture")


def _check_schema(m: _Model) -> None:
    """Each mapped value against the schema's own types and bounds, naming the config.json field."""
    fields = {f.name: f for f in ModelConfig.__attrs_attrs__}
    for key, value in m.items():
        problem = check_value(fields[key], value)
        if problem is not None:
            field = m.fields.get(key, key)
            raise fail(field, f"{field} gives model.{key}, which {problem}")


def precision_dtype(cfg: dict[str, Any]) -> tuple[str, str]:
    """(precision.dtype, why) for an HF config: its weights' dtype, so conversion is lossless.

    transformers 5 writes `dtype`, 4.x `torch_dtype`; a file with both must agree (each version
    reads a different one). Without either, transformers loads the model in float32: so does recipec."""
    c = HFConfig(cfg)
    new, old = c.choice("dtype", HF_DTYPES, None), c.choice("torch_dtype", HF_DTYPES, None)
    if new is not None and old is not None and new != old:
        raise fail("dtype", f"dtype = {_json_name(cfg['dtype'])} and torch_dtype = {_json_name(cfg['torch_dtype'])} "
                   "disagree", hint="transformers 5 reads dtype and 4.x torch_dtype: give both the weights' dtype")
    if new is None and old is None:
        return "fp32", "config.json names none, and transformers loads such a model in float32"
    field = "dtype" if new is not None else "torch_dtype"
    return new or old, f"config.json {field} = {_json_name(cfg[field])}"


def _json_name(value: str) -> str:
    """A dtype name already checked against HF_DTYPES, quoted as JSON writes it."""
    return f'"{value}"'


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
        raise HFImportError(f"unknown base {shown(repr(base))}; use pretrain or finetune")
    cfg, directory = read_hf_config(path)
    m, _row = _map(cfg)
    fields, sources = dict(m), dict(m.fields)
    model_type = cfg["model_type"]
    architectures = HFConfig(cfg).texts("architectures")
    if architectures is not None and (not architectures or not all(architectures)):
        raise fail("architectures", f"architectures must name the model class, got {shown(repr(architectures))}")
    family = _family_base(model_type, fields)
    directory = directory.resolve()
    toks = tokenizer_files(directory)
    # the finetune base goes after the model (see _base/finetune.toml)
    extends = ["_base/pretrain", family] if base == "pretrain" else [family, "_base/finetune"]
    fields.setdefault("seq_length", min(4096, fields.get("max_position_embeddings", 4096)))
    sources.setdefault("seq_length", "max_position_embeddings")
    dtype, dtype_note = precision_dtype(cfg)
    doc: dict[str, Any] = {"extends": extends, **({"name": name} if name else {}), "model": fields,
                           "precision": {"dtype": dtype}}
    if toks:
        doc["tokenizer"] = {"type": "huggingface", "path": str(directory)}
    if base == "finetune":
        doc["checkpoint"] = {"pretrained": str(directory)}
    header = [f"Imported by `recipec import-hf` from {shown(str(directory / 'config.json'))}",
              f"(model_type {model_type!r}, {shown((architectures or ['?'])[0], 80)}).",
              "Every [model] field and precision.dtype come from that config.json; the rest from the bases."]
    notes = {"precision": [f"the weights' dtype ({dtype_note}),",
                           "so `recipec convert` both ways is bit-exact; bf16 trains faster on GPUs but rounds fp32 weights."],
             "tokenizer": [f"tokenizer files found: {', '.join(toks)}"]}
    text = toml_document(doc, header, notes)
    _check_compiles(text, sources)
    return text


def _check_compiles(text: str, sources: dict[str, str]) -> None:
    """Compile the generated recipe as `recipec build` will; its errors become HFImportErrors naming
    the config.json field each [model] key came from."""
    from .api import build

    with tempfile.TemporaryDirectory(prefix="recipec-import-") as tmp:
        recipe = Path(tmp) / "imported.toml"
        recipe.write_text(text, encoding="utf-8")
        try:
            build(recipe, artifact_dir=str(Path(tmp) / "build"))
        except RecipeError as exc:
            problems = []
            for p in exc.problems:
                key = p.key or ""
                field = sources.get(key.removeprefix("model."), "") if key.startswith("model.") else ""
                problems.append(Problem(HFImportError, f"the imported recipe does not compile: [{key}] {p.message}",
                                        key=f"config.json:{field}" if field else (key or None), hint=p.hint))
            raise HFImportError(problems) from None


def hf_config(model: Any, *, dtype: str = "float32", token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json (transformers 4.x/5.x readable) for a derived recipec ModelConfig.

    `dtype` is the exported weights' (written as both `dtype`, which transformers 5 reads, and
    `torch_dtype`, which 4.x reads); `token_ids` the `bos/eos/pad_token_id` of the recipe's tokenizer
    (runtime/hf/export_files.py), which generate() and pipelines read from here."""
    if dtype not in HF_DTYPES:
        raise HFImportError(f"dtype {dtype!r} has no Hugging Face export name; use float32, bfloat16 or float16")
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
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
        **(token_ids or {}),
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
