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

from .schema import ModelConfig, RecipeConfig

GIB = 1024**3


@attrs.frozen
class ParamCount:
    embedding: int  # input embedding (padded vocab)
    output: int  # untied output layer (0 when tied)
    per_layer_dense: int  # attention + norms + dense MLP or router/shared expert
    per_layer_experts: int  # routed experts of one MoE layer
    final_norm: int

    @property
    def per_layer(self) -> int:
        return self.per_layer_dense + self.per_layer_experts


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

    def mlp(ffn: int) -> int:
        up = (2 if model.gated_linear_unit else 1) * h * ffn
        bias = ((2 if model.gated_linear_unit else 1) * ffn + h) if model.add_bias_linear else 0
        return up + ffn * h + bias

    experts = 0
    if model.is_moe:
        assert model.num_moe_experts is not None and model.moe_ffn_hidden_size is not None
        dense = h * model.num_moe_experts  # router
        if model.moe_shared_expert_intermediate_size:
            dense += mlp(model.moe_shared_expert_intermediate_size)
        experts = model.num_moe_experts * mlp(model.moe_ffn_hidden_size)
    else:
        dense = mlp(model.ffn_hidden_size)
    embedding = vocab * h
    if model.position_embedding_type == "learned_absolute":
        embedding += (model.max_position_embeddings or model.seq_length) * h
    output = 0 if model.share_embeddings_and_output_weights else vocab * h
    return ParamCount(embedding, output, attention + 2 * norm + dense, experts, norm)


def total_params(model: ModelConfig, vocab: int) -> int:
    c = count_params(model, vocab)
    return c.embedding + c.output + model.num_layers * c.per_layer + c.final_norm


def active_params(model: ModelConfig, vocab: int) -> int:
    """Parameters a token passes through (routed experts counted top-k times)."""
    c = count_params(model, vocab)
    per_layer = c.per_layer_dense
    if model.is_moe:
        assert model.num_moe_experts is not None
        per_layer += c.per_layer_experts * model.moe_router_topk // model.num_moe_experts
    return c.embedding + c.output + model.num_layers * per_layer + c.final_norm


def flops_per_step(config: RecipeConfig, vocab: int) -> int:
    """Model FLOPs of one optimizer step (forward + backward), Megatron-LM's formula:

    12 * B * s * L * h^2 * ( (1 + g/a + s/h) * (a*d/h)          attention
                             + (f/h) * k * glu                   MLP (k experts routed to)
                             + (f_shared/h) * glu                shared experts
                             + V / (2 * L * h) )                 logits
    with glu = 3/2 for gated MLPs, else 1.
    """
    m = config.model
    assert m.kv_channels is not None and m.num_query_groups is not None and m.ffn_hidden_size is not None
    b, s, layers, h = config.train.global_batch_size, m.seq_length, m.num_layers, m.hidden_size
    glu = 1.5 if m.gated_linear_unit else 1.0
    query_ratio = m.kv_channels * m.num_attention_heads / h
    attention = (1 + m.num_query_groups / m.num_attention_heads + s / h) * query_ratio
    ffn = m.moe_ffn_hidden_size if m.is_moe else m.ffn_hidden_size
    assert ffn is not None
    routed = m.moe_router_topk if m.is_moe else 1
    mlp = ffn / h * routed * glu
    shared = (m.moe_shared_expert_intermediate_size or 0) / h * glu
    logits = vocab / (2 * layers * h)
    return int(12 * b * s * layers * h * h * (attention + mlp + shared + logits))


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

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead + self.fp8

    def as_gib(self) -> dict[str, float]:
        fields = attrs.asdict(self)
        fields["total"] = self.total
        return {k: round(v / GIB, 2) for k, v in fields.items()}


def stage_params(config: RecipeConfig, vocab: int) -> list[int]:
    """Parameters held by each pipeline stage (all TP/EP shards together)."""
    m, p = config.model, config.parallel
    c = count_params(m, vocab)
    pp = p.pipeline_model_parallel_size
    layers_per_stage = m.num_layers // pp
    stages = [layers_per_stage * c.per_layer for _ in range(pp)]
    stages[0] += c.embedding
    stages[-1] += c.output + c.final_norm
    if pp > 1 and c.output == 0:
        stages[-1] += c.embedding  # tied embeddings are duplicated on the last stage
    return stages


def estimate_memory(config: RecipeConfig, vocab: int, data_parallel: int, microbatches: int) -> MemoryEstimate:
    m, p, prec = config.model, config.parallel, config.precision
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    c = count_params(m, vocab)
    layers = m.num_layers // pp
    # The first stage holds the input embedding, the last the output layer; with PP=1 one GPU holds both.
    ends = c.embedding + c.output + c.final_norm if pp == 1 else max(c.embedding, c.output + c.final_norm)
    dense = (layers * c.per_layer_dense + ends) / tp
    experts = layers * c.per_layer_experts / (ep * etp)
    share = 1.0 if config.peft.method is None else 0.01
    grad_bytes = 4 if prec.grad_reduce_in_fp32 or prec.dtype == "fp32" else 2
    state_bytes = (0 if prec.dtype == "fp32" else 4) + (8 if config.optimizer.optimizer == "adam" else 4)
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
    fp8 = (layers * c.per_layer_dense / tp + experts) * FP8_BYTES_PER_LINEAR_WEIGHT if prec.fp8 else 0
    return MemoryEstimate(int(weights), int(gradients), int(optimizer_bytes), int(activations), overhead, int(fp8))


def _activation_bytes(config: RecipeConfig, vocab: int, microbatches: int) -> float:
    """Activations of the first stage under 1F1B: up to PP microbatches in flight."""
    m, p = config.model, config.parallel
    assert m.kv_channels is not None and m.num_query_groups is not None and m.ffn_hidden_size is not None
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    s, b, h = m.seq_length / cp, config.train.micro_batch_size, m.hidden_size
    unit = 2 if config.precision.dtype != "fp32" else 4
    qkv = m.kv_channels * (m.num_attention_heads + 2 * m.num_query_groups)
    ffn = m.moe_ffn_hidden_size * m.moe_router_topk if m.is_moe and m.moe_ffn_hidden_size else m.ffn_hidden_size
    # Tensor-parallel parts: QKV out, attention out (flash: O + softmax stats), fc1 out, act out.
    tp_part = s * b * (qkv + h + ffn * (2 if m.gated_linear_unit else 1) + ffn) * unit
    # Replicated unless sequence parallel: two norm inputs, QKV and fc1 inputs, proj and fc2 in/out.
    rep_part = s * b * h * 6 * unit
    sp = tp if p.sequence_parallel else 1
    per_layer = tp_part / tp + rep_part / sp
    layers = m.num_layers // pp
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
