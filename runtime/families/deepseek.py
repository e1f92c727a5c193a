"""DeepSeek-V2 / V3 (runtime half): the MLA + shared-expert MoE weight table and DeepSeek-only config.

Module names are the local spec's (Megatron-Core's MLA spec, `get_gpt_layer_local_spec(
multi_latent_attention=True, qk_layernorm=True)`):

  HF (transformers 5 on-disk names)               Megatron-Core
  self_attn.q_proj            (no q LoRA: V2-Lite) self_attention.linear_q_proj
  self_attn.q_a_proj                              self_attention.linear_q_down_proj
  self_attn.q_a_layernorm                         self_attention.q_layernorm
  self_attn.q_b_proj                              self_attention.linear_q_up_proj
  self_attn.kv_a_proj_with_mqa                    self_attention.linear_kv_down_proj
  self_attn.kv_a_layernorm                        self_attention.kv_layernorm
  self_attn.kv_b_proj                             self_attention.linear_kv_up_proj
  mlp.gate.weight / .e_score_correction_bias      mlp.router.weight / .expert_bias
  mlp.experts.{E}.{gate,up,down}_proj             mlp.experts.local_experts.{E}.linear_fc1/fc2
  mlp.shared_experts.{gate,up,down}_proj          mlp.shared_experts.linear_fc1/fc2
  mlp.{gate,up,down}_proj (first_k_dense layers)  mlp.linear_fc1/fc2

Every tensor is copied as is (gate/up concatenated for fc1): both sides lay the q heads out as
[nope | rope] per head and kv_b as [k_nope | v] per head, and the RoPE halves need no permutation.
HF V3 stores its rotary dims interleaved (`rope_interleave`) and rotates pairs (x0, x1), ...; V2
rotates the same pairs as complex numbers; Megatron's MLA de-interleaves (x0, x2, ... | x1, x3, ...)
before its rotate-half (rope_utils, `multi_latent_attention=True`). q and k are permuted alike, so
q.k, and with it every logit, is the same.

The Transformer Engine spec fuses the q/kv latent norms into the up projections
(`linear_q_up_proj.layer_norm_weight`) and a dense layer's pre-MLP norm into fc1
(`mlp.linear_fc1.layer_norm_weight`): the checkpoint aliases map those keys back to the local names.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from recipec.compiler.errors import Problem, RecipeError

from .base import Rule, RuntimeFamily

_L = "decoder.layers.{L}."
_H = "model.layers.{L}."
_A = _L + "self_attention."
_X = _L + "mlp.experts.local_experts.{E}."

NORMS = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
)
MLA = (
    Rule(_A + "linear_q_proj.weight", (_H + "self_attn.q_proj.weight",)),  # q_lora_rank unset (V2-Lite)
    Rule(_A + "linear_q_down_proj.weight", (_H + "self_attn.q_a_proj.weight",)),
    Rule(_A + "q_layernorm.weight", (_H + "self_attn.q_a_layernorm.weight",)),
    Rule(_A + "linear_q_up_proj.weight", (_H + "self_attn.q_b_proj.weight",)),
    Rule(_A + "linear_kv_down_proj.weight", (_H + "self_attn.kv_a_proj_with_mqa.weight",)),
    Rule(_A + "kv_layernorm.weight", (_H + "self_attn.kv_a_layernorm.weight",)),
    Rule(_A + "linear_kv_up_proj.weight", (_H + "self_attn.kv_b_proj.weight",)),
    Rule(_A + "linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
)
DENSE_MLP = (  # the first `first_k_dense_replace` layers
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up"),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
)
MOE = (
    Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",)),
    Rule(_L + "mlp.router.expert_bias", (_H + "mlp.gate.e_score_correction_bias",)),  # V3 only
    Rule(_X + "linear_fc1.weight", (_H + "mlp.experts.{E}.gate_proj.weight",
                                    _H + "mlp.experts.{E}.up_proj.weight"), "gate_up"),
    Rule(_X + "linear_fc2.weight", (_H + "mlp.experts.{E}.down_proj.weight",)),
    Rule(_L + "mlp.shared_experts.linear_fc1.weight", (_H + "mlp.shared_experts.gate_proj.weight",
                                                       _H + "mlp.shared_experts.up_proj.weight"), "gate_up"),
    Rule(_L + "mlp.shared_experts.linear_fc2.weight", (_H + "mlp.shared_experts.down_proj.weight",)),
)
V3_WEIGHTS = NORMS + MLA + DENSE_MLP + MOE
V2_WEIGHTS = tuple(r for r in V3_WEIGHTS if not r.mcore.endswith("router.expert_bias"))  # no expert bias

# Transformer Engine checkpoint keys (layer axis prepended, or `decoder.layers.<n>.` when the layers
# are not homogeneous, as with first_k_dense) -> local-spec module names.
CHECKPOINT_ALIASES = {
    "decoder.layers.self_attention.linear_q_up_proj.layer_norm_weight": _A + "q_layernorm.weight",
    "decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight": _A + "kv_layernorm.weight",
}

# LoRA on MLA: the up projections (column parallel, TP-sharded by heads) and the output projection;
# the down projections are small and replicated in the TE spec.
LORA_TARGETS = {
    # The default peft.target_modules name linear_qkv, which MLA does not have: it matches nothing here.
    "linear_qkv": ("self_attention.linear_qkv", "column"),
    "linear_q_proj": ("self_attention.linear_q_proj", "column"),
    "linear_q_up_proj": ("self_attention.linear_q_up_proj", "column"),
    "linear_kv_up_proj": ("self_attention.linear_kv_up_proj", "column"),
    "linear_proj": ("self_attention.linear_proj", "row"),
    "linear_fc1": ("mlp.linear_fc1", "column"),
    "linear_fc2": ("mlp.linear_fc2", "row"),
}


def config_kwargs(model: Any) -> dict[str, Any]:
    """DeepSeek-only TransformerConfig keys, as Megatron-Bridge's DeepSeek bridges set them: the router
    runs in fp32 (as transformers' and DeepSeek's gate: `_keep_in_fp32_modules_strict = ["gate.weight"]`),
    and RoPE is not fused (Bridge turns MLA's fused YaRN RoPE off for DeepSeek)."""
    return {"apply_rope_fusion": False, **({"moe_router_dtype": "fp32"} if model.is_moe else {})}


def _mla_without_te() -> None:
    """megatron-core 0.16's MLA asks `isinstance(self.linear_proj, TELinear)` whenever its TE import
    "succeeded"; without Transformer Engine that import yields MagicMock placeholders, and isinstance
    raises. The check only concerns TE's fp8 output saving: turn it off when TELinear is no class."""
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False


_mla_without_te()

# transformers (and DeepSeek's own modeling code) build q_a_layernorm / kv_a_layernorm with RMSNorm's
# default eps, not rms_norm_eps; Megatron's MLA gives them layernorm_epsilon. Equal for the published
# models (rms_norm_eps 1e-6); a config with another rms_norm_eps differed by ~1e-4 in the logits
# (found by tests/hf/test_new_user_families.py).
LATENT_NORM_EPS = 1e-6


def post_build(model: Any, _model_config: Any) -> None:
    """The latent norms' eps as transformers fixes it, in every MLA block (MTP layers too): the local
    spec's q/kv_layernorm, or the Transformer Engine spec's norms fused into linear_q_up_proj /
    linear_kv_up_proj (LayerNormLinear, which keeps `eps` and a `layer_norm_weight`)."""
    for module in model.modules():
        if not hasattr(module, "linear_kv_down_proj"):  # not a MultiLatentAttention
            continue
        for name in ("q_layernorm", "kv_layernorm", "linear_q_up_proj", "linear_kv_up_proj"):
            norm = getattr(module, name, None)
            fused = name.startswith("linear_") and hasattr(norm, "layer_norm_weight")
            if hasattr(norm, "eps") and (fused or name.endswith("layernorm")):
                norm.eps = LATENT_NORM_EPS


def _mla_puts_a_norm_on_q() -> bool:
    """Megatron-Core 0.19's MLA (mla_qk_norm_config) turns the q projection of a model without
    q LoRA into a fused norm+linear when qk_layernorm is on: a norm DeepSeek-V2-Lite does not have
    (transformers: a plain q_proj). 0.16 builds the plain projection."""
    return importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def layer_spec(model: Any, ctx: Any) -> Any:
    """The generic decoder spec, refused by name where the installed Megatron-Core cannot build the
    model the recipe describes (MLA without q LoRA on 0.19, found running the DeepSeek HF tests on
    0.19): a clear exit 2 instead of Megatron's ValueError, or a model with an extra norm."""
    from ..layer_spec import decoder_spec

    if model.q_lora_rank is None and _mla_puts_a_norm_on_q():
        raise RecipeError([Problem(
            RecipeError, "multi-latent attention without q LoRA (model.q_lora_rank unset, as DeepSeek-V2-Lite) "
            "cannot be built on this Megatron-Core: from 0.19 its MLA puts a norm on the q projection that "
            "the model does not have", key="model.q_lora_rank",
            hint="use megatron-core 0.16 (what Python 3.11 installs) for this model, or a config with "
                 "q_lora_rank set (DeepSeek-V3)")])
    return decoder_spec(model, ctx)[0]


FAMILIES = tuple(
    RuntimeFamily(name=name, weights=weights, checkpoint_aliases=CHECKPOINT_ALIASES, lora_targets=LORA_TARGETS,
                  config_kwargs=config_kwargs, post_build=post_build, layer_spec=layer_spec)
    for name, weights in (("deepseek_v3", V3_WEIGHTS), ("deepseek_v2", V2_WEIGHTS))
)
