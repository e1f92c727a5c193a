"""Weight-table pieces shared by the GPT-style decoder families (not a family itself).

Each is a tuple of `Rule(mcore, hf, transform)`: `mcore` a Megatron parameter as the local layer
spec names it, `hf` the Hugging Face tensor(s) it is made of, with `{L}` (layer) and `{E}` (expert)
placeholders, `transform` a named invertible transform (runtime/hf/mappings.TRANSFORMS, or the
family's own `RuntimeFamily.transforms`). A family's `weights` is a sum of these and its own rules.
"""

from __future__ import annotations

from ..hf.mappings import Rule

L = "decoder.layers.{L}."  # a Megatron layer
H = "model.layers.{L}."  # the same HF layer
X = L + "mlp.experts.local_experts.{E}."  # one routed expert (SequentialMLP's module names)

COMMON = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),  # absent when tied
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), "qkv"),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",)),
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
)
DENSE_MLP = (
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "gate_up"),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",)),
)
QKV_BIAS = (
    Rule(L + "self_attention.linear_qkv.bias",
         (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), "qkv"),
)
QK_NORM = (
    Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
)
MIXTRAL_MOE = (
    Rule(L + "mlp.router.weight", (H + "block_sparse_moe.gate.weight",)),
    Rule(X + "linear_fc1.weight", (H + "block_sparse_moe.experts.{E}.w1.weight",
                                   H + "block_sparse_moe.experts.{E}.w3.weight"), "gate_up"),
    Rule(X + "linear_fc2.weight", (H + "block_sparse_moe.experts.{E}.w2.weight",)),
)
QWEN_MOE = (
    Rule(L + "mlp.router.weight", (H + "mlp.gate.weight",)),
    Rule(X + "linear_fc1.weight", (H + "mlp.experts.{E}.gate_proj.weight",
                                   H + "mlp.experts.{E}.up_proj.weight"), "gate_up"),
    Rule(X + "linear_fc2.weight", (H + "mlp.experts.{E}.down_proj.weight",)),
)
