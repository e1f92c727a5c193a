"""Compile-time arithmetic: parameters, model FLOPs and memory per GPU.

Pure functions of a derived RecipeConfig, so the plan can refuse a layout that
cannot fit before a job queues. The FLOPs formula is Megatron-LM's
`num_floating_point_operations` (full attention count, no causal halving);
memory follows Korthikanti et al. 2022 adapted to GQA, gated MLPs and flash
attention, plus the mixed-precision and distributed-optimizer byte counts of
Megatron-Core.
"""

from __future__ import annotations

import attrs

from .modes import extra_models
from .schema import ModelConfig, RecipeConfig

GIB = 1024**3


@attrs.frozen
class ParamCount:
    embedding: int  # input embedding (padded vocab)
    output: int  # untied output layer (0 when tied)
    per_layer_dense: int  # attention + norms + dense MLP or router/shared expert
    per_layer_experts: int  # routed experts of one MoE layer
    final_norm: int
    first_dense: int = 0  # leading layers of an MoE model with a dense MLP instead (moe_first_k_dense)
    dense_layer: int = 0  # parameters of one such layer (attention + norms + dense MLP)
    mtp_dense: int = 0  # multi-token prediction: projections, norms and its layers' non-expert part
    mtp_experts: int = 0  # the MTP layers' routed experts

    @property
    def per_layer(self) -> int:
        return self.per_layer_dense + self.per_layer_experts

    def layers(self, start: int, stop: int) -> tuple[int, int]:
        """(non-expert, routed-expert) parameters of decoder layers [start, stop)."""
        dense = max(0, min(stop, self.first_dense) - max(start, 0))
        moe = stop - start - dense
        return dense * self.dense_layer + moe * self.per_layer_dense, moe * self.per_layer_experts


def count_params(model: ModelConfig, vocab: int) -> ParamCount:
    """Exact parameter count of Megatron-Core's GPTModel for this config."""
    h, kv, heads, groups = model.hidden_size, model.kv_channels, model.num_attention_heads, model.num_query_groups
    assert kv is not None and groups is not None and model.ffn_hidden_size is not None
    norm = h if model.normalization == "RMSNorm" else 2 * h
    qkv_out = kv * (heads + 2 * groups)
    attention = h * qkv_out + heads * kv * h
    if model.add_bias_linear:
        attention += qkv_out + h
    elif model.add_qkv_bias:
        attention += qkv_out
    if model.qk_layernorm:
        attention += 2 * (kv if model.normalization == "RMSNorm" else 2 * kv)
    if model.multi_latent_attention:
        attention = _mla_params(model)

    def mlp(ffn: int) -> int:
        up = (2 if model.gated_linear_unit else 1) * h * ffn
        bias = ((2 if model.gated_linear_unit else 1) * ffn + h) if model.add_bias_linear else 0
        return up + ffn * h + bias

    layer_norms = 4 if model.sandwich_norm else 2  # Gemma's sandwich: a norm after attention and MLP too
    experts = 0
    first_dense = dense_layer = 0
    if model.is_moe:
        assert model.num_moe_experts is not None and model.moe_ffn_hidden_size is not None
        dense = h * model.num_moe_experts  # router
        if model.moe_shared_expert_intermediate_size:
            dense += mlp(model.moe_shared_expert_intermediate_size)
        experts = model.num_moe_experts * mlp(model.moe_ffn_hidden_size)
        first_dense = min(model.moe_first_k_dense, model.num_layers)
        dense_layer = attention + layer_norms * norm + mlp(model.ffn_hidden_size)
    else:
        dense = mlp(model.ffn_hidden_size)
    embedding = vocab * h
    if model.position_embedding_type == "learned_absolute":
        embedding += (model.max_position_embeddings or model.seq_length) * h
    output = 0 if model.share_embeddings_and_output_weights else vocab * h
    per_layer_dense = attention + layer_norms * norm + dense
    # Multi-token prediction (Megatron's MultiTokenPredictionLayer): enorm, hnorm, eh_proj (2h -> h),
    # one decoder layer like the last one, a final norm; it shares the embedding and output layer.
    mtp = model.mtp_num_layers or 0
    return ParamCount(embedding, output, per_layer_dense, experts, norm, first_dense, dense_layer,
                      mtp * (3 * norm + 2 * h * h + per_layer_dense), mtp * experts)


def total_params(model: ModelConfig, vocab: int) -> int:
    c = count_params(model, vocab)
    dense, experts = c.layers(0, model.num_layers)
    return c.embedding + c.output + dense + experts + c.final_norm + c.mtp_dense + c.mtp_experts


def active_params(model: ModelConfig, vocab: int) -> int:
    """Parameters a token passes through (routed experts counted top-k times)."""
    c = count_params(model, vocab)
    dense, experts = c.layers(0, model.num_layers)
    experts += c.mtp_experts
    if model.is_moe:
        assert model.num_moe_experts is not None
        experts = experts * model.moe_router_topk // model.num_moe_experts
    return c.embedding + c.output + dense + experts + c.final_norm + c.mtp_dense


def _mla_params(model: ModelConfig) -> int:
    """Multi-head latent attention (Megatron's MLASelfAttention): q through a q_lora_rank latent (or one
    full projection), k/v through a shared kv_lora_rank latent plus a RoPE key, a norm on each latent
    (RMSNorm: one weight each), and the output projection."""
    h, heads = model.hidden_size, model.num_attention_heads
    q_head = model.qk_head_dim + model.qk_pos_emb_head_dim
    latent_norm = 1 if model.normalization == "RMSNorm" else 2
    if model.q_lora_rank is None:
        q = h * heads * q_head
    else:
        q = h * model.q_lora_rank + model.q_lora_rank * latent_norm + model.q_lora_rank * heads * q_head
    kv = (h * (model.kv_lora_rank + model.qk_pos_emb_head_dim) + model.kv_lora_rank * latent_norm
          + model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim))
    out = heads * model.v_head_dim * h + (h if model.add_bias_linear else 0)
    return q + kv + out


def flops_per_step(config: RecipeConfig, vocab: int) -> int:
    """Model FLOPs of one optimizer step (forward + backward), Megatron-LM's formula, plus the
    forward passes of the frozen models the training mode adds (compiler/modes: a third of
    their forward + backward each)."""
    b = config.train.global_batch_size
    total = model_flops(config.model, b, vocab)
    for extra in extra_models(config):
        total += int(model_flops(extra.model, b, vocab) * extra.forwards_per_sequence / 3)
    return total


def model_flops(m: ModelConfig, b: int, vocab: int) -> int:
    """Forward + backward FLOPs of `b` sequences through one model, Megatron-LM's formula:

    12 * B * s * L * h^2 * ( (1 + g/a + s/h) * (a*d/h)          attention
                             + (f/h) * k * glu                   MLP (k experts routed to)
                             + (f_shared/h) * glu                shared experts
                             + V / (2 * L * h) )                 logits
    with glu = 3/2 for gated MLPs, else 1. Multi-head latent attention, dense leading layers of an
    MoE model and multi-token prediction: `_latent_moe_flops`.
    """
    assert m.kv_channels is not None and m.num_query_groups is not None and m.ffn_hidden_size is not None
    s, layers, h = m.seq_length, m.num_layers, m.hidden_size
    glu = 1.5 if m.gated_linear_unit else 1.0
    query_ratio = m.kv_channels * m.num_attention_heads / h
    attention = (1 + m.num_query_groups / m.num_attention_heads + _keys_per_query(m) / h) * query_ratio
    ffn = m.moe_ffn_hidden_size if m.is_moe else m.ffn_hidden_size
    assert ffn is not None
    routed = m.moe_router_topk if m.is_moe else 1
    mlp = ffn / h * routed * glu
    shared = (m.moe_shared_expert_intermediate_size or 0) / h * glu
    logits = vocab / (2 * layers * h)
    if m.multi_latent_attention or (m.is_moe and m.moe_first_k_dense) or m.mtp_num_layers:
        return _latent_moe_flops(m, b, vocab)
    return int(12 * b * s * layers * h * h * (attention + mlp + shared + logits))


def _keys_per_query(m: ModelConfig) -> float:
    """The formula's s in its score and context matmuls, averaged over layers: a sliding-window layer
    computes min(s, window + 1) keys per query (Megatron's window (w, 0) includes the query itself);
    with window_attn_skip_freq N every Nth layer is global."""
    s = m.seq_length
    if m.window_size is None:
        return float(s)
    every = m.window_attn_skip_freq
    global_layers = m.num_layers // every if every else 0
    windowed = m.num_layers - global_layers
    return (global_layers * s + windowed * min(s, m.window_size + 1)) / m.num_layers


def _latent_moe_flops(m: ModelConfig, b: int, vocab: int) -> int:
    """Megatron-LM's formula for DeepSeek-style models (matmul FLOPs, forward + backward, full s x s
    attention as above), per token:

      (L + mtp) * attention                        MLA: 6 * (q + kv + o projections) + 6 * s * a * (dq + dv)
    + k * 6 * h * f * (2 glu)                      the dense leading layers (moe_first_k_dense)
    + (L - k + mtp) * 6 * h * (f_e * topk + f_shared) * (2 glu)    the MoE layers, MTP's included
    + mtp * 6 * 2h * h                             MTP's eh_proj
    + (1 + mtp) * 6 * h * V                        logits of the model and of each MTP depth
    (the router, norms and RoPE are not matmuls of this size and are left out, as Megatron does).
    """
    assert m.kv_channels is not None and m.num_query_groups is not None and m.ffn_hidden_size is not None
    s, layers, h, heads = m.seq_length, m.num_layers, m.hidden_size, m.num_attention_heads
    mtp = m.mtp_num_layers or 0
    up = 3 if m.gated_linear_unit else 2  # matmuls per MLP width (gate, up, down)
    if m.multi_latent_attention:
        q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
        q = h * heads * q_head if m.q_lora_rank is None else m.q_lora_rank * (h + heads * q_head)
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)
        attention = 6 * (q + kv + heads * m.v_head_dim * h) + 6 * s * heads * (q_head + m.v_head_dim)
    else:
        kv_ch, groups = m.kv_channels, m.num_query_groups
        attention = 6 * h * kv_ch * (2 * heads + 2 * groups) + 12 * s * heads * kv_ch
    dense_layers, moe_layers = layers + mtp, 0
    moe_width = 0
    if m.is_moe:
        assert m.moe_ffn_hidden_size is not None
        dense_layers = min(m.moe_first_k_dense, layers)
        moe_layers = layers - dense_layers + mtp
        moe_width = m.moe_ffn_hidden_size * m.moe_router_topk + (m.moe_shared_expert_intermediate_size or 0)
    per_token = ((layers + mtp) * attention + dense_layers * 6 * up * h * m.ffn_hidden_size
                 + moe_layers * 6 * up * h * moe_width + mtp * 12 * h * h + (1 + mtp) * 6 * h * vocab)
    return int(b * s * per_token)


# Peak memory FP8 adds over bf16, per weight of the Transformer Engine linears: TE keeps FP8
# copies of the weights (and transposes) through backward and saves some inputs in FP8 instead of
# bf16. Measured on an H100 with tensorwise scaling (bench/RESULTS.md): +0.31 GiB at Llama-3.2-1B
# (0.34 B/weight), +1.88 GiB at 8 Llama-3-8B layers (1.16 B/weight); this is their upper envelope.
FP8_BYTES_PER_LINEAR_WEIGHT = 1.25


@attrs.frozen
class MemoryEstimate:
    """Bytes on the busiest GPU (the first pipeline stage), by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    fp8: int = 0
    extra_models: int = 0  # frozen models of the training mode (weights only; compiler/modes)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.overhead + self.fp8
                + self.extra_models)

    def as_gib(self) -> dict[str, float]:
        fields = attrs.asdict(self)
        fields["total"] = self.total
        return {k: round(v / GIB, 2) for k, v in fields.items()}


def stage_params(config: RecipeConfig, vocab: int) -> list[int]:
    """Parameters held by each pipeline stage (all TP/EP shards together)."""
    m, p = config.model, config.parallel
    c = count_params(m, vocab)
    pp = p.pipeline_model_parallel_size
    return [dense + experts for dense, experts in _stage_parts(c, m.num_layers, pp)]


def _stage_parts(c: ParamCount, num_layers: int, pp: int) -> list[tuple[int, int]]:
    """(non-expert, routed-expert) parameters of each pipeline stage: its layers (dense leading layers
    on the first), the embedding on the first, the output layer, final norm and MTP block on the last."""
    per = num_layers // pp
    stages = [list(c.layers(i * per, (i + 1) * per)) for i in range(pp)]
    stages[0][0] += c.embedding
    stages[-1][0] += c.output + c.final_norm + c.mtp_dense
    stages[-1][1] += c.mtp_experts
    if pp > 1 and c.output == 0:
        stages[-1][0] += c.embedding  # tied embeddings are duplicated on the last stage
    return [(dense, experts) for dense, experts in stages]


def estimate_memory(config: RecipeConfig, vocab: int, data_parallel: int, microbatches: int) -> MemoryEstimate:
    m, p, prec = config.model, config.parallel, config.precision
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    c = count_params(m, vocab)
    # Weights and their states on the stage holding the most (the first holds the input embedding and
    # any dense leading layers, the last the output layer and MTP; with PP=1 one GPU holds all).
    parts = _stage_parts(c, m.num_layers, pp)
    busiest = max(range(pp), key=lambda i: parts[i][0] / tp + parts[i][1] / (ep * etp))
    dense = parts[busiest][0] / tp
    experts = parts[busiest][1] / (ep * etp)
    per = m.num_layers // pp
    layer_dense = c.layers(busiest * per, (busiest + 1) * per)[0]  # what FP8 keeps copies of
    share = 1.0 if config.peft.method is None else 0.01
    grad_bytes = 4 if prec.grad_reduce_in_fp32 or prec.dtype == "fp32" else 2
    state_bytes = _optimizer_state_bytes(config)
    # Megatron-Core shards optimizer states over data x context ranks for dense parameters and
    # over the expert-data-parallel ranks (world / (ETP x EP x PP)) for experts.
    dense_shards = data_parallel * cp if config.optimizer.use_distributed_optimizer else 1
    expert_shards = max(1, tp * cp * data_parallel // (etp * ep)) if config.optimizer.use_distributed_optimizer else 1
    weights = (dense + experts) * prec.param_bytes
    gradients = (dense + experts) * share * grad_bytes
    optimizer_bytes = share * state_bytes * (dense / dense_shards + experts / expert_shards)
    activations = _activation_bytes(config, vocab, microbatches)
    # CUDA context, NCCL buffers and allocator slack (an assumption until checked on the GPU).
    overhead = int(2 * GIB) if config.launch.accelerator != "cpu" else 0
    fp8 = (layer_dense / tp + experts) * FP8_BYTES_PER_LINEAR_WEIGHT if prec.fp8 else 0
    # A frozen model of the mode is laid out like the trained one (same TP/PP/EP) and holds weights only.
    frozen = sum(max(stage_params(attrs.evolve(config, model=e.model), vocab)) / tp * prec.param_bytes
                 for e in extra_models(config))
    return MemoryEstimate(int(weights), int(gradients), int(optimizer_bytes), int(activations), overhead, int(fp8),
                          int(frozen))


def _activation_bytes(config: RecipeConfig, vocab: int, microbatches: int) -> float:
    """Activations of the first stage under 1F1B: up to PP microbatches in flight."""
    m, p = config.model, config.parallel
    assert m.kv_channels is not None and m.num_query_groups is not None and m.ffn_hidden_size is not None
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    s, b, h = m.seq_length / cp, config.train.micro_batch_size, m.hidden_size
    unit = 2 if config.precision.dtype != "fp32" else 4
    qkv = m.kv_channels * (m.num_attention_heads + 2 * m.num_query_groups)
    if m.multi_latent_attention:  # the q/kv latents, then q and k of (nope + rope) and v per head
        q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
        qkv = (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_pos_emb_head_dim + m.num_attention_heads * (
            2 * q_head + m.v_head_dim)
    ffn = m.moe_ffn_hidden_size * m.moe_router_topk if m.is_moe and m.moe_ffn_hidden_size else m.ffn_hidden_size
    if m.is_moe:
        ffn += m.moe_shared_expert_intermediate_size or 0
    # Tensor-parallel parts: QKV out, attention out (flash: O + softmax stats), fc1 out, act out.
    tp_part = s * b * (qkv + h + ffn * (2 if m.gated_linear_unit else 1) + ffn) * unit
    # Replicated unless sequence parallel: two norm inputs, QKV and fc1 inputs, proj and fc2 in/out.
    rep_part = s * b * h * 6 * unit
    sp = tp if p.sequence_parallel else 1
    per_layer = tp_part / tp + rep_part / sp
    layers = m.num_layers // pp + ((m.mtp_num_layers or 0) if pp == 1 else 0)  # MTP runs on the last stage
    if m.recompute_granularity == "full":
        stored = layers * s * b * h * unit / sp + per_layer
    else:
        stored = layers * per_layer
    in_flight = min(pp, microbatches)
    if p.virtual_pipeline_model_parallel_size:
        in_flight = min(microbatches, pp + (pp - 1) / p.virtual_pipeline_model_parallel_size)
    # Vocab-parallel cross entropy keeps one fp32 softmax of the logits for backward (last stage).
    logits = s * b * vocab / tp * 4
    return stored * in_flight + (logits if pp == 1 else 0)


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


def _optimizer_state_bytes(config: RecipeConfig) -> int:
    """Bytes of optimizer state per trained parameter: the master copy (none when the model is fp32)
    and Adam's two moments (SGD: one buffer). With optimizer.use_precision_aware_optimizer the moments
    take their configured dtypes, and an fp32 master of bf16 weights is kept as its 16-bit remainder
    (Megatron-Core's store_param_remainders, on by default): bf16 moments measured 6.9 GiB less than
    fp32 ones on the 1B recipe, 6 bytes a parameter (bench/RESULTS.md, session 5)."""
    o, dtype = config.optimizer, config.precision.dtype
    if not o.use_precision_aware_optimizer:
        return (0 if dtype == "fp32" else 4) + (8 if o.optimizer == "adam" else 4)
    if dtype == "fp32":
        master = 0
    elif dtype == "bf16" and o.main_params_dtype == "fp32":
        master = 2
    else:
        master = DTYPE_BYTES[o.main_params_dtype]
    return master + DTYPE_BYTES[o.exp_avg_dtype] + DTYPE_BYTES[o.exp_avg_sq_dtype]
