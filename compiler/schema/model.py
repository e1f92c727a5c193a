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
        "llama", "Model family (a module of compiler/families: its HF bridge, weights and layer spec); "
        "`recipec list` names them.",
    )  # checked against the family registry by validate.py (no list here: families are plug-ins)
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
        "silu", "MLP activation (gelu_tanh: GELU's tanh approximation, Gemma; quick_gelu: x * sigmoid(1.702 x), "
        "GPT-OSS).", choices=("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "squared_relu")
    )
    glu_linear_offset: float = option(
        0.0, "Added to the linear half of a gated MLP: act(gate) * (up + offset) (GPT-OSS: 1.0).",
        min=-MAX_FACTOR, max=MAX_FACTOR)
    activation_func_clamp_value: float | None = option(
        None, "Clamp of the gated MLP's inputs (GPT-OSS: 7.0); unset for none.", min=0.0, max=MAX_FACTOR)
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
    rope_beta_fast: float = option(32.0, "YaRN: fast rotation boundary (beta_fast).", min=0.0, max=MAX_FACTOR)
    rope_beta_slow: float = option(1.0, "YaRN: slow rotation boundary (beta_slow).", min=0.0, max=MAX_FACTOR)
    rope_mscale: float = option(1.0, "YaRN: attention temperature scale (mscale).", min=0.0, max=MAX_FACTOR)
    rope_mscale_all_dim: float = option(
        0.0, "YaRN: mscale applied to all dims (DeepSeek: mscale_all_dim).", min=0.0, max=MAX_FACTOR)
    rotary_base_local: float | None = option(
        None, "RoPE theta of the sliding-window layers when it differs (Gemma 3: 10000).", min=1.0, max=MAX_THETA)
    share_embeddings_and_output_weights: bool = option(
        False, "Tie the input embedding and the output layer."
    )
    qk_layernorm: bool = option(False, "Normalize queries and keys per head (Qwen3, Gemma 3).")
    layernorm_zero_centered_gamma: bool = option(
        False, "Norm weights stored zero-centred, applied as (1 + w) (Gemma).")
    sandwich_norm: bool = option(
        False, "Also normalize each attention and MLP output before the residual add (Gemma 2/3).")
    scale_embeddings: bool = option(False, "Multiply the input embeddings by sqrt(hidden_size) (Gemma).")
    # Attention variants.
    softmax_scale: float | None = option(
        None, "Attention logit scale; unset for 1/sqrt(head dim) (Gemma 3: query_pre_attn_scalar ** -0.5).",
        min=0.0, max=MAX_FACTOR)
    softmax_type: str = option(
        "vanilla", "Attention softmax: vanilla, off-by-one, or learnable (a learned per-head sink logit, GPT-OSS).",
        choices=("vanilla", "off-by-one", "learnable"))
    window_size: int | None = option(
        None, "Sliding-window attention: tokens each query sees to its left; unset for full attention.",
        min=1, max=MAX_TOKENS)
    window_attn_skip_freq: int | None = option(
        None, "With window_size: every Nth layer attends globally (Gemma 3: 6, GPT-OSS: 2); unset for all "
        "layers windowed.", min=1, max=MAX_LAYERS)
    # Multi-head latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = option(False, "Multi-head latent attention (DeepSeek): low-rank q/kv projections.")
    q_lora_rank: int | None = option(None, "MLA: query low-rank dim; unset for a full query projection.",
                                     min=1, max=MAX_WIDTH)
    kv_lora_rank: int = option(512, "MLA: key/value latent dim.", min=1, max=MAX_WIDTH)
    qk_head_dim: int = option(128, "MLA: per-head q/k dim without RoPE (qk_nope_head_dim).", min=1, max=MAX_WIDTH)
    qk_pos_emb_head_dim: int = option(64, "MLA: per-head q/k RoPE dim (qk_rope_head_dim).", min=1, max=MAX_WIDTH)
    v_head_dim: int = option(128, "MLA: per-head value dim.", min=1, max=MAX_WIDTH)
    # DEEPSEEK-FIELDS / GEMMA3-FIELDS / GPT-OSS-FIELDS: family helpers add fields here.
    rope_yarn_truncate: bool = option(
        True, "YaRN: round the correction range to whole dims (HF rope_parameters.truncate; GPT-OSS: false).")
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
    moe_first_k_dense: int = option(
        0, "Leading layers with a dense MLP before the MoE layers (HF first_k_dense_replace).", min=0, max=MAX_LAYERS)
    moe_router_score_function: str = option(
        "softmax", "Router scores: softmax, or sigmoid (DeepSeek-V3).", choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = option(
        False, "Softmax over all experts before top-k (GPT-OSS: false, top-k then softmax).")
    moe_router_enable_expert_bias: bool = option(
        False, "Aux-loss-free load balancing: a per-expert bias on the routing scores (DeepSeek-V3).")
    moe_router_bias_update_rate: float = option(
        1e-3, "Update rate of the expert bias.", min=0.0, max=MAX_FACTOR)
    moe_router_num_groups: int | None = option(
        None, "Group-limited routing: expert groups (DeepSeek-V3: 8); unset for none.", min=1, max=MAX_HEADS)
    moe_router_group_topk: int | None = option(
        None, "Group-limited routing: groups each token may use (DeepSeek-V3: 4).", min=1, max=MAX_HEADS)
    moe_router_topk_scaling_factor: float | None = option(
        None, "Scale of the routed experts' weights (DeepSeek: routed_scaling_factor).", min=0.0, max=MAX_FACTOR)
    # Multi-token prediction (DeepSeek-V3).
    mtp_num_layers: int | None = option(None, "Multi-token-prediction layers; unset for none.", min=1, max=MAX_LAYERS)
    mtp_loss_scaling_factor: float = option(0.1, "Weight of the multi-token-prediction loss.", min=0.0,
                                            max=MAX_FACTOR)
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
