"""Megatron-Core objects from the frozen config: TransformerConfig, GPTModel chunks, DDP.

Every argument comes from the compiled RecipeConfig; nothing here reads TOML
or guesses. On CPU (no CUDA) the model is built with CPU initialization and
without fused kernels that exist only on GPUs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from recipec.compiler.errors import RecipeError
from recipec.compiler.schema import ParallelConfig, RecipeConfig

from . import families
from .families import SpecContext
from .layer_spec import LOCAL_LABEL, TE_LABEL, decoder_spec, uses_transformer_engine

log = logging.getLogger("recipec.runtime")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (HF gelu_pytorch_tanh / gelu_new; Gemma)."""
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    # Megatron's own function object: its MLP recognises it (fused GEGLU, clamp and linear offset).
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "squared_relu": lambda x: torch.pow(F.relu(x), 2),
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _supported(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop keys this Megatron-Core version does not know (0.16 .. 0.19 differ)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(
        inspect.signature(cls).parameters)
    dropped = sorted(k for k in kwargs if k not in names)
    if dropped:
        log.debug("megatron-core %s lacks %s; left at their defaults", cls.__name__, dropped)
    return {k: v for k, v in kwargs.items() if k in names}


def _have_apex_wgrad_fusion() -> bool:
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


# Fused weight-gradient accumulation on the Transformer Engine linears when apex is absent (see
# _fuse_te_wgrad). A module-level switch, not a recipe key: the GPU bench turns it off for an A/B.
TE_WGRAD_FUSION = True


def _fuse_te_wgrad(chunks: list[GPTModel]) -> int:
    """Let TE's linears accumulate their weight gradients straight into Megatron's main_grad.

    Without apex, gradient_accumulation_fusion stays off in the TransformerConfig, because the
    output layer (a plain tensor_parallel.ColumnParallelLinear) raises in __init__ when it is on
    and fused_weight_gradient_mlp_cuda is missing. TE's own GEMMs need no apex for it, so the flag
    is set on the TE modules alone, before DDP wraps them. Checked in TE 2.20 and megatron-core
    0.19: te.pytorch.Linear and LayerNormLinear store the constructor argument as the attribute
    fuse_wgrad_accumulation and read it in every forward (it is passed into the autograd function
    there); in backward they fetch weight.main_grad (set by Megatron-Core DDP's grad buffer),
    accumulate the wgrad GEMM into it, set weight.grad_added_to_main_grad = True and return a
    dummy grad, which DDP's backward hook then skips (it adds param.grad to main_grad only while
    grad_added_to_main_grad is False, and zero_grad_buffer resets the flag every step): the same
    contract as Megatron's own gradient_accumulation_fusion=True path. Frozen weights (LoRA bases)
    are left alone by TE (it checks weight.requires_grad). Returns how many modules were switched.
    """
    import transformer_engine.pytorch as te

    kinds = (te.Linear, te.LayerNormLinear)
    n = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, kinds) and not module.fuse_wgrad_accumulation:
                module.fuse_wgrad_accumulation = True
                n += 1
    return n


def layout_sizes(p: ParallelConfig) -> dict[str, int | None]:
    """The parallel sizes, under the names Megatron-Core's TransformerConfig and
    initialize_model_parallel share (the schema uses the same names on purpose)."""
    names = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
             "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size")
    return {name: getattr(p, name) for name in names}


def transformer_config(c: RecipeConfig, *, on_gpu: bool, te: bool) -> TransformerConfig:
    m, p, prec = c.model, c.parallel, c.precision
    dtype = _DTYPES[prec.dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=_ACTIVATIONS[m.activation],
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        layernorm_zero_centered_gamma=m.layernorm_zero_centered_gamma,
        glu_linear_offset=m.glu_linear_offset,
        activation_func_clamp_value=m.activation_func_clamp_value,
        softmax_type=m.softmax_type,
        softmax_scale=m.softmax_scale,
        window_size=(m.window_size, 0) if m.window_size else None,
        window_attn_skip_freq=m.window_attn_skip_freq if m.window_size else None,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        **layout_sizes(p),
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method if m.recompute_granularity == "full" else None,
        recompute_num_layers=m.recompute_num_layers if m.recompute_granularity == "full" else None,
        # Fused kernels that exist only on GPUs (apex/TE/triton) are off on CPU.
        use_cpu_initialization=not on_gpu,
        # The output layer is a plain ColumnParallelLinear, which needs apex's
        # fused_weight_gradient_mlp_cuda for this (raises in __init__ without); without apex the
        # TE linears get fused wgrad accumulation afterwards (build_model_chunks, _fuse_te_wgrad).
        gradient_accumulation_fusion=on_gpu and te and _have_apex_wgrad_fusion(),
        masked_softmax_fusion=on_gpu,
        bias_activation_fusion=on_gpu and m.gated_linear_unit and m.activation == "silu" and te,
        # Megatron's grouped-GEMM experts refuse the fused bias-dropout-add with linear biases
        # (TEGroupedMLP asserts; GPT-OSS on one H200 in session 6): off for biased MoE models.
        bias_dropout_fusion=on_gpu and not (m.is_moe and m.add_bias_linear),
        # Megatron's MLA fuses RoPE only for YaRN (MLATransformerConfig raises otherwise).
        apply_rope_fusion=on_gpu and te and (not m.multi_latent_attention or m.rope_scaling == "yarn"),
        persist_layer_norm=on_gpu and te,
        cross_entropy_loss_fusion=on_gpu,
        cross_entropy_fusion_impl="te" if te else "native",
    )
    if m.is_moe:
        kwargs.update(
            num_moe_experts=m.num_moe_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_grouped_gemm=m.moe_grouped_gemm and on_gpu,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        )
        if m.moe_first_k_dense:  # dense leading layers (DeepSeek first_k_dense_replace): 0 = dense, 1 = MoE
            k = min(m.moe_first_k_dense, m.num_layers)
            kwargs["moe_layer_freq"] = [0] * k + [1] * (m.num_layers - k)
    if m.mtp_num_layers:
        kwargs.update(mtp_num_layers=m.mtp_num_layers, mtp_loss_scaling_factor=m.mtp_loss_scaling_factor)
    cls: type[TransformerConfig] = TransformerConfig
    if m.multi_latent_attention:
        cls = MLATransformerConfig
        kwargs.update(_mla_kwargs(c))
    kwargs.update(_cuda_graph_kwargs(c))
    if prec.fp8:
        kwargs.update(
            fp8="e4m3" if prec.fp8_format == "e4m3" else "hybrid",
            fp8_recipe=prec.fp8,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
            fp8_param=prec.fp8_param_gather,
        )
    kwargs.update(families.get(m.architecture).config_kwargs(m))
    # Megatron reads YaRN's parameters of a non-MLA model as config attributes it does not declare
    # (GPTModel's YarnRotaryEmbedding and the attention's mscale: getattr(config, "yarn_...")).
    attributes = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("yarn_")]}
    if m.rope_scaling == "yarn" and not m.multi_latent_attention:
        attributes = {**_yarn_attributes(c), **attributes}
    config = cls(**_supported(cls, kwargs))
    for name, value in attributes.items():
        setattr(config, name, value)
    return config


def _mla_kwargs(c: RecipeConfig) -> dict[str, Any]:
    """MLATransformerConfig's own fields: the low-rank projections and its RoPE (plain or YaRN)."""
    m = c.model
    if m.rope_scaling not in (None, "yarn"):
        raise RecipeError(f"model.rope_scaling={m.rope_scaling!r} with multi_latent_attention: Megatron-Core's MLA "
                          'has plain RoPE or YaRN only; set model.rope_scaling = "yarn" or unset it')
    return dict(
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
        qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
        rope_type="yarn" if m.rope_scaling == "yarn" else "rope",
        rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
        rotary_scaling_factor=m.rope_scaling_factor,
        original_max_position_embeddings=m.rope_original_max_position_embeddings,
        beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow,
        mscale=m.rope_mscale, mscale_all_dim=m.rope_mscale_all_dim,
    )


def _yarn_attributes(c: RecipeConfig) -> dict[str, Any]:
    """YaRN of a standard-attention model, under the attribute names GPTModel reads."""
    m = c.model
    return dict(
        yarn_rotary_scaling_factor=m.rope_scaling_factor,
        yarn_original_max_position_embeddings=m.rope_original_max_position_embeddings,
        yarn_beta_fast=m.rope_beta_fast, yarn_beta_slow=m.rope_beta_slow,
        yarn_mscale=m.rope_mscale, yarn_mscale_all_dim=m.rope_mscale_all_dim,
        yarn_correction_range_round_to_int=getattr(m, "rope_yarn_truncate", True),
    )


def _cuda_graph_kwargs(c: RecipeConfig) -> dict[str, Any]:
    """TransformerConfig keys for train.cuda_graph, in this Megatron-Core version's spelling.

    0.19 names a full-iteration graph `cuda_graph_impl="full_iteration"`; 0.16 spells it
    `cuda_graph_impl="local"` + `cuda_graph_scope="full_iteration"`. A version without either
    is an error, not a silent eager run.
    """
    mode = c.train.cuda_graph
    if mode == "none":
        return {}
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    if "cuda_graph_impl" not in fields:
        raise RecipeError(f"train.cuda_graph={mode!r}: this megatron-core has no cuda_graph_impl; "
                          'upgrade megatron-core or set train.cuda_graph="none"')
    kwargs: dict[str, Any] = dict(cuda_graph_warmup_steps=c.train.cuda_graph_warmup_steps,
                                  use_te_rng_tracker=_graphs_use_te_rng(c))
    if mode == "layers":
        kwargs["cuda_graph_impl"] = "local"
    elif "full_iteration" in str(fields["cuda_graph_impl"].type):
        kwargs["cuda_graph_impl"] = "full_iteration"
    else:
        kwargs.update(cuda_graph_impl="local", cuda_graph_scope="full_iteration")
    return kwargs


def _graphs_use_te_rng(c: RecipeConfig) -> bool:
    """CUDA graphs with TE modules need TE's RNG tracker (TE's attention asserts it while capturing)."""
    return c.train.cuda_graph != "none" and uses_transformer_engine(c.model.transformer_impl, c.train.torch_compile)


def init_model_parallel(c: RecipeConfig) -> None:
    """Megatron's process groups for the recipe's layout, and the seeded RNG streams.

    CUDA graphs replay RNG draws (dropout) only from graph-safe generators: TE's tracker with TE
    modules, else Megatron's tracker with `use_cudagraphable_rng`.
    """
    parallel_state.initialize_model_parallel(**layout_sizes(c.parallel))
    torch.manual_seed(c.train.seed)
    extra: dict[str, bool] = {}
    if c.train.cuda_graph != "none":
        extra = {"te_rng_tracker": True} if _graphs_use_te_rng(c) else {"use_cudagraphable_rng": True}
    tensor_parallel.model_parallel_cuda_manual_seed(c.train.seed, **extra)


def build_model_chunks(c: RecipeConfig, padded_vocab: int, *, on_gpu: bool) -> tuple[list[GPTModel], str]:
    """This rank's model chunks (one per virtual pipeline stage) and which layer spec they use.

    The model family (runtime/families) may add TransformerConfig and GPTModel kwargs, replace the
    layer spec, and adjust each built chunk (`post_build`)."""
    m = c.model
    family = families.get(m.architecture)
    te = uses_transformer_engine(m.transformer_impl, c.train.torch_compile)
    backend = TE_LABEL if te else LOCAL_LABEL  # decoder_spec says which local attention
    if c.precision.fp8 and not te:
        raise RecipeError(f"precision.fp8={c.precision.fp8!r} needs Transformer Engine, which does not import "
                          "here; install recipec[te] or unset precision.fp8")
    config = transformer_config(c, on_gpu=on_gpu, te=te)
    vpp = c.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        ctx = SpecContext(te=te, on_gpu=on_gpu, moe_grouped_gemm=m.moe_grouped_gemm and on_gpu, config=config,
                          vp_stage=vp_stage if vpp > 1 else None)
        spec, backend = decoder_spec(m, ctx)
        if family.layer_spec is not None:
            spec = family.layer_spec(m, ctx)
        yarn = m.rope_scaling == "yarn" and not m.multi_latent_attention
        kwargs: dict[str, Any] = dict(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            if vpp > 1 else parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            if vpp > 1 else parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
            position_embedding_type="yarn" if yarn else m.position_embedding_type,
            rotary_percent=m.rotary_percent,
            rotary_base=int(m.rotary_base),
            rope_scaling=m.rope_scaling == "llama3",
            rope_scaling_factor=m.rope_scaling_factor,
            vp_stage=vp_stage if vpp > 1 else None,
        )
        if m.rope_scaling == "linear":
            kwargs["seq_len_interpolation_factor"] = m.rope_scaling_factor
        if m.mtp_num_layers:
            kwargs["mtp_block_spec"] = _mtp_block_spec(config, spec, te, ctx.vp_stage)
        kwargs.update(family.model_kwargs(m))
        model = GPTModel(**_supported(GPTModel, kwargs))
        if family.post_build is not None:
            family.post_build(model, m)
        if on_gpu:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if on_gpu and backend == "transformer_engine" and not config.gradient_accumulation_fusion:
        if TE_WGRAD_FUSION:
            n = _fuse_te_wgrad(chunks)
            log.info(f"fused wgrad accumulation on {n} Transformer Engine linear modules (no apex: "
                     "the output layer accumulates unfused)")
        else:
            log.info("fused wgrad accumulation off (runtime.model.TE_WGRAD_FUSION = False)")
    return chunks, backend


def _mtp_block_spec(config: TransformerConfig, spec: Any, te: bool, vp_stage: int | None) -> Any:
    """Megatron's multi-token-prediction block (its layers repeat the decoder's last layer spec)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(config, spec, use_transformer_engine=te, vp_stage=vp_stage)


def wrap_ddp(c: RecipeConfig, chunks: list[GPTModel]) -> list[DistributedDataParallel]:
    """Megatron-Core DDP with contiguous grad buffers (what the distributed optimizer shards)."""
    o = c.optimizer
    # With one data-parallel rank there is no reduction to overlap; the overlap machinery
    # (buckets, hooks, streams) would only cost time (measured on H100, bench/RESULTS.md).
    several = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1
    overlap_grad = o.overlap_grad_reduce and several
    ddp_config = DistributedDataParallelConfig(**_supported(DistributedDataParallelConfig, dict(
        grad_reduce_in_fp32=c.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=o.overlap_param_gather and o.use_distributed_optimizer and several,
        use_distributed_optimizer=o.use_distributed_optimizer,
        check_for_nan_in_grad=c.train.check_for_nan_in_grad,
        bucket_size=None if not overlap_grad else 40_000_000,
    )))
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk overlaps its grad reduce with the rest of backward.
            disable_bucketing=i > 0,
        ))
    return wrapped
