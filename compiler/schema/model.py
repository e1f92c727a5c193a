"""[model]: the transformer, named as Megatron-Core's TransformerConfig names it."""

import attrs

from ._fields import option
from .bounds import (
    MAX_FACTOR,
    MAX_FFN,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_SMALL,
    MAX_THETA,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
)


@attrs.frozen
class ModelConfig:
    """GPT-family decoder (Llama, Qwen, Mistral, Mixtral...): shape, norms, RoPE, MoE."""

    architecture: str = option(
        "llama", "Family, used for the HF bridge and `recipec list`.",
        choices=("gpt", "llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gemma2"),
    )
    transformer_impl: str = option(
        "auto", "Layer implementation: Transformer Engine's fused modules, or Megatron-Core's local modules "
        "with torch SDPA; auto takes Transformer Engine where it imports (and local with train.torch_compile).",
        choices=("auto", "transformer_engine", "local"),
    )
    num_layers: int = option(12, "Number of transformer layers.", min=1, max=MAX_LAYERS)
    hidden_size: int = option(768, "Model width (embedding and residual size).", min=1, max=MAX_WIDTH)
    ffn_hidden_size: int | None = option(
        None, "MLP inner size.", min=1, derived="4 * hidden_size", max=MAX_FFN)
    num_attention_heads: int = option(12, "Query heads.", min=1, max=MAX_HEADS)
    num_query_groups: int | None = option(
        None, "Key/value heads (grouped-query attention).", min=1, derived="num_attention_heads", max=MAX_HEADS)
    kv_channels: int | None = option(
        None, "Per-head dimension.", min=1, derived="hidden_size / num_attention_heads", max=MAX_WIDTH)
    seq_length: int = option(2048, "Training sequence length in tokens.", min=1, max=MAX_TOKENS)
    max_position_embeddings: int | None = option(
        None, "Longest position the model supports.", min=1, derived="seq_length", max=MAX_TOKENS)
    vocab_size: int = option(32000, "Tokenizer vocabulary size before padding.", min=1, max=MAX_VOCAB)
    make_vocab_size_divisible_by: int = option(
        128, "Pad the vocabulary to a multiple of this times tensor-parallel size.", min=1, max=MAX_VOCAB)
    normalization: str = option("RMSNorm", "Layer norm kind.", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-5, "Epsilon of the norms.", min=0.0, max=MAX_SMALL)
    activation: str = option(
        "silu", "MLP activation.", choices=("silu", "gelu", "relu", "squared_relu")
    )
    gated_linear_unit: bool = option(True, "Gated MLP (SwiGLU with silu, GeGLU with gelu).")
    position_embedding_type: str = option(
        "rope", "Positional encoding.", choices=("rope", "learned_absolute", "none")
    )
    rotary_base: float = option(10000.0, "RoPE theta.", min=1.0, max=MAX_THETA)
    rotary_percent: float = option(1.0, "Fraction of the head dim that is rotated.", min=0.0, max=1.0)
    rope_scaling: str | None = option(
        None, "RoPE frequency scaling for long context.", choices=("llama3", "linear", "yarn")
    )
    rope_scaling_factor: float = option(8.0, "Scaling factor of `rope_scaling`.", min=1.0, max=MAX_FACTOR)
    rope_original_max_position_embeddings: int = option(
        8192, "Context the RoPE scaling was derived from (Llama 3.1: 8192).", min=1, max=MAX_TOKENS)
    share_embeddings_and_output_weights: bool = option(
        False, "Tie the input embedding and the output layer."
    )
    qk_layernorm: bool = option(False, "Normalize queries and keys per head (Qwen3).")
    add_bias_linear: bool = option(False, "Biases in the linear layers.")
    add_qkv_bias: bool = option(False, "Bias in the QKV projection only (Qwen2).")
    hidden_dropout: float = option(0.0, "Dropout after attention and MLP.", min=0.0, max=1.0)
    attention_dropout: float = option(0.0, "Dropout on attention probabilities.", min=0.0, max=1.0)
    init_method_std: float = option(0.02, "Std of the normal weight init.", min=0.0, max=MAX_SMALL)
    # Mixture of experts.
    num_moe_experts: int | None = option(None, "Routed experts per MoE layer; unset for dense.", min=1, max=MAX_HEADS)
    moe_router_topk: int = option(2, "Experts each token is routed to.", min=1, max=MAX_HEADS)
    moe_ffn_hidden_size: int | None = option(
        None, "Inner size of each expert's MLP.", min=1, derived="ffn_hidden_size", max=MAX_FFN)
    moe_shared_expert_intermediate_size: int | None = option(
        None, "Inner size of the shared expert(s); unset for none.", min=1, max=MAX_FFN)
    moe_router_load_balancing_type: str = option(
        "aux_loss", "Load balancing of the router.",
        choices=("aux_loss", "seq_aux_loss", "sinkhorn", "none"),
    )
    moe_aux_loss_coeff: float = option(1e-3, "Weight of the load-balancing loss.", min=0.0, max=MAX_FACTOR)
    moe_grouped_gemm: bool = option(True, "Run experts as one grouped GEMM.")
    moe_token_dispatcher_type: str = option(
        "alltoall", "How tokens reach experts.", choices=("alltoall", "allgather")
    )
    # Activation memory.
    recompute_granularity: str | None = option(
        None, "Activation recomputation.", choices=("selective", "full")
    )
    recompute_method: str = option(
        "uniform", "Which layers `full` recomputes.", choices=("uniform", "block")
    )
    recompute_num_layers: int = option(1, "Layers per recompute chunk (full).", min=1, max=MAX_LAYERS)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Megatron pads the vocabulary to a multiple of divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


def derive_model(model: ModelConfig) -> ModelConfig:
    """Fill every unset derived field; the formulas are the ones in `option(derived=...)`."""
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    return attrs.evolve(
        model,
        ffn_hidden_size=ffn,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        moe_ffn_hidden_size=(model.moe_ffn_hidden_size or ffn) if model.is_moe else None,
    )
