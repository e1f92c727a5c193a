"""Gemma 3 (text) at run time: its HF weight table, its layer spec and the model adjustments.

Hugging Face Gemma3ForCausalLM -> Megatron-Core module names (this family's layer spec,
runtime/families/gemma3_layers.py; norms are stored zero-centred on both sides, so every norm is a copy):
- input_layernorm -> input_layernorm (TE: fused into linear_qkv, saved as linear_qkv.layer_norm_weight);
- post_attention_layernorm (the sandwich norm after attention) -> self_attention.linear_proj.post_layernorm;
- pre_feedforward_layernorm -> pre_mlp_layernorm (TE: linear_fc1.layer_norm_weight);
- post_feedforward_layernorm -> mlp.linear_fc2.post_layernorm;
- q_norm / k_norm -> q_layernorm / k_layernorm; q/k/v fused as for Llama; gate/up fused (GeGLU).
The embedding is tied (no lm_head tensor in Gemma checkpoints). The sliding windows, qk-norm,
softmax_scale and zero-centred gamma are generic TransformerConfig fields (runtime/model.py);
this family adds the sandwich norms, the local RoPE base and the sqrt(hidden) embedding scaling.
"""

from __future__ import annotations

from typing import Any

from ._decoder import DENSE_MLP, QK_NORM, H, L
from .base import Rule, RuntimeFamily, SpecContext

WEIGHTS = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),  # absent when tied (every published Gemma 3)
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), "qkv"),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "self_attention.linear_proj.post_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "pre_feedforward_layernorm.weight",)),
    Rule(L + "mlp.linear_fc2.post_layernorm.weight", (H + "post_feedforward_layernorm.weight",)),
) + QK_NORM + DENSE_MLP


def _layer_spec(model: Any, ctx: SpecContext) -> Any:
    from .gemma3_layers import gemma3_spec

    return gemma3_spec(te=ctx.te, windowed=bool(model.window_size), config=ctx.config, vp_stage=ctx.vp_stage)


def _post_build(chunk: Any, model: Any) -> None:
    from .gemma3_layers import install_gemma3_modules

    install_gemma3_modules(chunk, rotary_base_local=model.rotary_base_local, scale_embeddings=model.scale_embeddings)


FAMILIES = (
    RuntimeFamily(name="gemma3", weights=WEIGHTS, layer_spec=_layer_spec, post_build=_post_build),
)
