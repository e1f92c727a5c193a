"""DeepSeek-V3 and DeepSeek-V2 (V2-Lite): the config.json <-> [model] bridge of model_type
"deepseek_v3" / "deepseek_v2".

What makes them their own families, each mapped onto a generic Megatron-Core feature:
- multi-head latent attention (MLA): queries through a low-rank `q_lora_rank` latent (V2-Lite: a full
  projection), keys/values through one shared `kv_lora_rank` latent plus a `qk_rope_head_dim` RoPE key;
  per head `qk_nope_head_dim` + `qk_rope_head_dim` for q/k and `v_head_dim` for v; RMSNorms on both
  latents (`qk_layernorm = true` in Megatron's MLA spec);
- RoPE, plain or YaRN with DeepSeek's mscale: cos/sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim),
  the softmax by mscale(f, mscale_all_dim)^2 / sqrt(q head dim);
- `first_k_dense_replace` dense SwiGLU layers (`intermediate_size`), then MoE layers
  (`moe_first_k_dense`) with `n_shared_experts` shared experts of `moe_intermediate_size` each;
- routing: V3 scores with a sigmoid, adds a learned-by-update expert bias (`e_score_correction_bias`,
  aux-loss-free balancing) for the choice only, limits each token to `topk_group` of `n_group`
  expert groups (a group scores as the sum of its top-2 experts), renormalizes the top-k and scales
  them by `routed_scaling_factor`; V2 softmaxes over all experts and keeps the top-k unnormalized.

Multi-token prediction (V3's `num_nextn_predict_layers`) is not imported: transformers' model holds
no MTP weights (it ignores checkpoint layer 61), so conversion has nothing to fill it with. The bundled
V3 recipe turns it on for training (`model.mtp_num_layers = 1`); an export writes the main model only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..hf_fields import HFConfig, HFImportError, fail
from ..schema import ModelConfig
from ..text import shown
from . import _decoder as d
from .base import Family, FamilyProblem, ModelFields

HF_TOP_PER_GROUP = 2  # transformers' DeepseekV3TopkRouter scores a group by its top-2 experts
HF_Q_LORA_RANK = 1536  # DeepseekV2Config's and DeepseekV3Config's q_lora_rank when config.json has none


def _import_mla(c: HFConfig, m: ModelFields) -> None:
    m.put("multi_latent_attention", True)
    m.put("qk_layernorm", True)  # q_a_layernorm / kv_a_layernorm: Megatron's MLA spec builds them with it
    # The family bases set no q_lora_rank (recipes_toml/_models/ do): null means a full query projection,
    # the schema's default; a missing key means transformers' default rank.
    if "q_lora_rank" not in c.data:
        m.put("q_lora_rank", HF_Q_LORA_RANK, "q_lora_rank")
    elif c.data["q_lora_rank"] is not None:
        m.put("q_lora_rank", c.integer("q_lora_rank"), "q_lora_rank")
    m.put("kv_lora_rank", c.integer("kv_lora_rank"), "kv_lora_rank")
    m.put("qk_head_dim", c.integer("qk_nope_head_dim"), "qk_nope_head_dim")
    m.put("qk_pos_emb_head_dim", c.integer("qk_rope_head_dim"), "qk_rope_head_dim")
    m.put("v_head_dim", c.integer("v_head_dim"), "v_head_dim")
    # transformers sets head_dim = qk_rope_head_dim; recipec's kv_channels is the q/k head dim.
    m.put("kv_channels", m["qk_head_dim"] + m["qk_pos_emb_head_dim"], "qk_nope_head_dim")
    if not c.flag("rope_interleave", True):
        raise fail("rope_interleave", "rope_interleave = false (RoPE over the two halves of the rope dims) cannot be "
                   "expressed: Megatron's MLA rotates interleaved pairs, as DeepSeek's checkpoints are laid out")


def _import_rope(c: HFConfig, m: ModelFields) -> None:
    """RoPE as transformers applies it to DeepSeek (rope_parameters in 5.x, rope_scaling in 4.x): plain
    (rope_type "default": Megatron's MLA rope_type "rope"; the family bases set no scaling, so nothing is
    written), or YaRN, whose every field is written."""
    d.import_rope(c, m, yarn=True)
    if m.get("rope_scaling") is None:
        return
    _theta, scaling, _ = d.rope_parameters(c)
    assert scaling is not None
    where = scaling.prefix
    if scaling.has("attention_factor"):
        raise fail(f"{where}attention_factor", "an explicit YaRN attention_factor cannot be expressed: Megatron "
                   "derives it from factor, mscale and mscale_all_dim")
    if scaling.data.get("truncate", True) is not True:
        raise fail(f"{where}truncate", "YaRN truncate = false cannot be expressed for MLA (Megatron rounds the "
                   "correction range)")
    mscale, all_dim = scaling.number("mscale", 1.0), scaling.number("mscale_all_dim", 0.0)
    if not all_dim and mscale != 1.0:
        raise fail(f"{where}mscale", f"mscale = {mscale} without mscale_all_dim: transformers then ignores mscale "
                   "and Megatron does not", hint="give mscale_all_dim (DeepSeek: equal to mscale)")
    m.put("rope_mscale", mscale, f"{where}mscale")
    m.put("rope_mscale_all_dim", all_dim, f"{where}mscale_all_dim")


def _import_experts(c: HFConfig, m: ModelFields) -> int | None:
    """Experts, shared experts and the dense leading layers; returns top-k, None for a model whose
    layers are all dense (first_k_dense_replace >= num_hidden_layers: no expert is ever built)."""
    first_dense = c.integer("first_k_dense_replace", 0, min=0) or 0
    if first_dense >= m["num_layers"]:
        return None
    experts = c.integer("n_routed_experts")
    topk = c.integer("num_experts_per_tok")
    m.put("num_moe_experts", experts, "n_routed_experts")
    m.put("moe_router_topk", topk, "num_experts_per_tok")
    m.put("moe_ffn_hidden_size", c.integer("moe_intermediate_size"), "moe_intermediate_size")
    shared = c.integer("n_shared_experts", 0, min=0) or 0
    if shared:
        m.put("moe_shared_expert_intermediate_size", shared * m["moe_ffn_hidden_size"], "n_shared_experts")
    m.put("moe_first_k_dense", first_dense, "first_k_dense_replace")
    m.put("moe_router_topk_scaling_factor", c.number("routed_scaling_factor", 1.0, min=0.0), "routed_scaling_factor")
    m.put("moe_router_load_balancing_type", "seq_aux_loss" if c.flag("seq_aux", True) else "aux_loss", "seq_aux")
    m.put("moe_aux_loss_coeff", c.number("aux_loss_alpha", 0.0001, min=0.0), "aux_loss_alpha")
    return topk


def _import_v3(c: HFConfig, m: ModelFields) -> None:
    _import_common(c, m)
    topk = _import_experts(c, m)
    if topk is None:
        return
    for field, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if c.has(field) and c.text(field) != want:
            raise fail(field, f"{field} = {shown(repr(c.text(field)))}: transformers' DeepSeek-V3 routes with "
                       f"{want!r} only")
    if c.flag("norm_topk_prob", True) != (topk > 1):
        raise fail("norm_topk_prob", f"norm_topk_prob = {str(c.flag('norm_topk_prob', True)).lower()} with "
                   f"num_experts_per_tok {topk} cannot be expressed: Megatron's sigmoid router renormalizes the "
                   "top-k scores exactly when k > 1")
    m.put("moe_router_score_function", "sigmoid")
    m.put("moe_router_pre_softmax", True)  # as Megatron-Bridge; the sigmoid router does not read it
    m.put("moe_router_enable_expert_bias", True)
    groups, group_topk = c.integer("n_group", 1) or 1, c.integer("topk_group", 1) or 1
    if groups > 1 and group_topk < groups:
        if m["num_moe_experts"] % groups:
            raise fail("n_group", f"{m['num_moe_experts']} routed experts do not split into n_group = {groups}")
        if topk // group_topk != HF_TOP_PER_GROUP:
            raise fail("topk_group", f"num_experts_per_tok {topk} // topk_group {group_topk} is not "
                       f"{HF_TOP_PER_GROUP}: transformers scores a group by its top-2 experts, Megatron by its "
                       "top (num_experts_per_tok // topk_group)")
        m.put("moe_router_num_groups", groups, "n_group")
        m.put("moe_router_group_topk", group_topk, "topk_group")


def _import_v2(c: HFConfig, m: ModelFields) -> None:
    _import_common(c, m)
    topk = _import_experts(c, m)
    if topk is None:
        return
    if c.has("scoring_func") and c.text("scoring_func") != "softmax":
        raise fail("scoring_func", f"scoring_func = {shown(repr(c.text('scoring_func')))}: DeepSeek-V2 routes with "
                   "a softmax")
    if c.flag("norm_topk_prob") and topk > 1:
        raise fail("norm_topk_prob", "norm_topk_prob = true: transformers' DeepSeek-V2 ignores it (it never "
                   "renormalizes), so the model it describes is ambiguous", hint="set it to false")
    m.put("moe_router_score_function", "softmax")
    m.put("moe_router_pre_softmax", True)  # softmax over all experts, then top-k, no renormalization
    method = c.text("topk_method", "greedy")
    if method == "group_limited_greedy":
        groups, group_topk = c.integer("n_group"), c.integer("topk_group")
        if topk // group_topk != 1 or m["num_moe_experts"] % groups:
            raise fail("topk_group", f"group_limited_greedy with num_experts_per_tok {topk} // topk_group "
                       f"{group_topk} != 1: transformers scores a group by its best expert, Megatron by its top "
                       "(num_experts_per_tok // topk_group)")
        m.put("moe_router_num_groups", groups, "n_group")
        m.put("moe_router_group_topk", group_topk, "topk_group")
    elif method != "greedy":
        raise fail("topk_method", f"topk_method {shown(repr(method))} is not one transformers' DeepSeek-V2 has",
                   hint="greedy or group_limited_greedy")


def _import_common(c: HFConfig, m: ModelFields) -> None:
    q = c.table("quantization_config")
    if q is not None:
        raise fail("quantization_config", f"the weights are quantized (quant_method "
                   f"{shown(repr(q.text('quant_method', '?')))}; deepseek-ai/DeepSeek-V3 ships FP8 blocks with "
                   "per-block scale_inv tensors), which recipec does not convert",
                   hint="dequantize to bf16 first (DeepSeek's inference/fp8_cast_bf16.py) and drop "
                   "quantization_config from config.json")
    if c.integer("moe_layer_freq", 1) != 1:
        raise fail("moe_layer_freq", "moe_layer_freq != 1 (MoE on every Nth layer only) is not what transformers' "
                   "DeepSeek builds (every layer after first_k_dense_replace)")
    d.import_decoder(c, m)
    d.refuse_window(c)
    _import_mla(c, m)
    _import_rope(c, m)


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    d.export_decoder(model, cfg, qk_norm=True)
    if not model.multi_latent_attention:
        raise HFImportError(f"{cfg['model_type']} export needs model.multi_latent_attention = true")
    cfg.update(head_dim=model.qk_pos_emb_head_dim, q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
               qk_nope_head_dim=model.qk_head_dim, qk_rope_head_dim=model.qk_pos_emb_head_dim,
               v_head_dim=model.v_head_dim, attention_bias=False, num_nextn_predict_layers=0)
    d.export_rope(model, cfg, yarn=True)
    if not model.is_moe:  # every layer dense: the HF class builds no expert, whatever their sizes
        cfg.update(first_k_dense_replace=model.num_layers, n_routed_experts=1, num_experts_per_tok=1,
                   moe_intermediate_size=model.ffn_hidden_size, n_shared_experts=0, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0)
        return
    assert model.moe_ffn_hidden_size is not None
    shared = model.moe_shared_expert_intermediate_size or 0
    if shared % model.moe_ffn_hidden_size:
        raise HFImportError(f"moe_shared_expert_intermediate_size {shared} is not a multiple of moe_ffn_hidden_size "
                            f"{model.moe_ffn_hidden_size}: HF counts shared experts (n_shared_experts)")
    cfg.update(n_routed_experts=model.num_moe_experts, num_experts_per_tok=model.moe_router_topk,
               moe_intermediate_size=model.moe_ffn_hidden_size, n_shared_experts=shared // model.moe_ffn_hidden_size,
               first_k_dense_replace=min(model.moe_first_k_dense, model.num_layers),
               routed_scaling_factor=model.moe_router_topk_scaling_factor or 1.0,
               n_group=model.moe_router_num_groups or 1, topk_group=model.moe_router_group_topk or 1,
               aux_loss_alpha=model.moe_aux_loss_coeff, seq_aux=model.moe_router_load_balancing_type == "seq_aux_loss",
               output_router_logits=False)


def _export_v3(model: ModelConfig, cfg: dict[str, Any]) -> None:
    _export(model, cfg)
    cfg.update(rope_interleave=True, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    if model.is_moe and model.moe_router_score_function != "sigmoid" or not model.moe_router_enable_expert_bias:
        raise HFImportError("deepseek_v3 export needs moe_router_score_function = \"sigmoid\" and "
                            "moe_router_enable_expert_bias = true (transformers' DeepSeek-V3 router)")


def _export_v2(model: ModelConfig, cfg: dict[str, Any]) -> None:
    _export(model, cfg)
    if model.is_moe and (model.moe_router_score_function != "softmax" or not model.moe_router_pre_softmax
                         or model.moe_router_enable_expert_bias):
        raise HFImportError("deepseek_v2 export needs a softmax router over all experts "
                            "(moe_router_pre_softmax = true) without expert bias")
    grouped = model.moe_router_num_groups is not None and model.moe_router_num_groups > 1
    cfg.update(norm_topk_prob=False, scoring_func="softmax", mlp_bias=False,
               topk_method="group_limited_greedy" if grouped else "greedy")


def _validate(model: ModelConfig) -> Iterable[FamilyProblem]:
    """What the DeepSeek weight table and Megatron's MLA need of a [model] section."""
    if not model.multi_latent_attention:
        yield FamilyProblem("model.multi_latent_attention", f"{model.architecture} is a multi-head latent attention "
                            "model", hint="set model.multi_latent_attention = true")
    elif not model.qk_layernorm:
        yield FamilyProblem("model.qk_layernorm", "DeepSeek's MLA normalizes its q and kv latents",
                            hint="set model.qk_layernorm = true")
    if model.rope_scaling not in (None, "yarn"):
        yield FamilyProblem("model.rope_scaling", f"rope_scaling = {model.rope_scaling!r}: Megatron's MLA has plain "
                            "RoPE or YaRN only", hint='set model.rope_scaling = "yarn" or unset it')
    elif model.rope_scaling is None and (model.rope_mscale_all_dim or model.rope_mscale != 1.0):
        yield FamilyProblem("model.rope_mscale_all_dim", "rope_mscale / rope_mscale_all_dim act only with "
                            'rope_scaling = "yarn"', hint="unset them, or set rope_scaling")
    groups, group_topk = model.moe_router_num_groups, model.moe_router_group_topk
    if model.is_moe and groups is not None:
        assert model.num_moe_experts is not None
        if model.num_moe_experts % groups:
            yield FamilyProblem("model.moe_router_num_groups", f"{model.num_moe_experts} experts do not split into "
                                f"{groups} groups")
        if group_topk is None or group_topk > groups or model.moe_router_topk < group_topk:
            yield FamilyProblem("model.moe_router_group_topk", f"group-limited routing needs 1 <= "
                                f"moe_router_group_topk <= moe_router_num_groups ({groups}) and <= moe_router_topk "
                                f"({model.moe_router_topk}), got {group_topk}")


FAMILIES = (
    Family(name="deepseek_v3", summary="DeepSeek-V3: MLA, dense-then-MoE, shared expert, sigmoid group-limited "
           "routing with expert bias, YaRN or plain RoPE, optional MTP",
           hf_model_types=("deepseek_v3",), hf_class="DeepseekV3ForCausalLM", base="_base/deepseek_v3",
           import_hf=_import_v3, export_hf=_export_v3, validate=_validate),
    Family(name="deepseek_v2", summary="DeepSeek-V2 / V2-Lite: MLA, dense-then-MoE, shared experts, softmax "
           "routing, YaRN or plain RoPE",
           hf_model_types=("deepseek_v2",), hf_class="DeepseekV2ForCausalLM", base="_base/deepseek_v2",
           import_hf=_import_v2, export_hf=_export_v2, validate=_validate),
)
