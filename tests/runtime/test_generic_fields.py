"""Generic [model] features mapped by runtime/model.py for every family (recipec issue 12), on real
Megatron-Core local modules in this process (single-rank gloo, fp32): multi-head latent attention
with dense-then-MoE layers and DeepSeek routing, sliding windows with a learned softmax sink, YaRN,
zero-centred norms, and the runtime family hooks. Each test fails without its mapping (the field
would be dropped and the model built as plain attention / all-MoE / plain norms)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")

from recipec.compiler import build

SMALL = ["model.architecture=gpt", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "precision.dtype=fp32", "launch.gpus_per_node=1"]
TOKENS = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(*overrides: str):
    from recipec.runtime.model import build_model_chunks

    compiled = build("llama3_tiny", [*SMALL, *overrides])
    (model,), backend = build_model_chunks(compiled.config, compiled.plan.padded_vocab_size, on_gpu=False)
    return model, backend


def _logits(model, **kwargs):
    position_ids = torch.arange(TOKENS.shape[1]).unsqueeze(0).expand_as(TOKENS)
    return model(TOKENS, position_ids, None, **kwargs)


def test_mla_with_dense_first_layer_and_deepseek_routing(mcore_tp1) -> None:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )
    from megatron.core.transformer import MLATransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    model, backend = _model(
        "model.multi_latent_attention=true", "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_head_dim=16",
        "model.qk_pos_emb_head_dim=8", "model.v_head_dim=8", "model.num_moe_experts=4", "model.moe_router_topk=2",
        "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "model.moe_first_k_dense=1",
        "model.moe_grouped_gemm=false", "model.moe_router_score_function=sigmoid",
        "model.moe_router_enable_expert_bias=true", "model.moe_router_num_groups=2", "model.moe_router_group_topk=1",
        "model.moe_router_topk_scaling_factor=2.5", 'model.rope_scaling="yarn"', "model.rope_scaling_factor=4.0",
        "model.rope_original_max_position_embeddings=8", "model.rope_mscale=0.7", "model.rope_mscale_all_dim=0.7")
    config = model.config
    assert isinstance(config, MLATransformerConfig) and config.rope_type == "yarn"
    assert (config.q_lora_rank, config.kv_lora_rank, config.v_head_dim, config.mscale) == (32, 16, 8, 0.7)
    assert config.moe_layer_freq == [0, 1]
    first, second = model.decoder.layers
    assert isinstance(first.self_attention, MLASelfAttention)
    assert isinstance(first.self_attention.rotary_pos_emb, YarnRotaryEmbedding)
    assert not isinstance(first.mlp, MoELayer) and isinstance(second.mlp, MoELayer)
    router = second.mlp.router
    assert router.score_function == "sigmoid" and router.expert_bias is not None
    assert (config.moe_router_num_groups, config.moe_router_group_topk, config.moe_router_topk_scaling_factor) \
        == (2, 1, 2.5)
    assert second.mlp.shared_experts is not None
    assert backend == "local+sdpa"  # MLA's narrower values go through LatentSDPAttention
    loss = _logits(model, labels=TOKENS)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert first.self_attention.linear_kv_up_proj.weight.grad.abs().sum() > 0


def test_sliding_window_with_learned_sink(mcore_tp1) -> None:
    """Layer 1 of 2 is windowed (skip freq 2: layer 2 attends globally): with the same weights, a
    4-token window changes no logit of positions 0..4 and changes later ones."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    sink = ['model.softmax_type="learnable"', "model.softmax_scale=0.3"]
    windowed, backend = _model(*sink, "model.window_size=4", "model.window_attn_skip_freq=2")
    full, _ = _model(*sink)
    full.load_state_dict(windowed.state_dict())
    attn1, attn2 = (layer.self_attention.core_attention for layer in windowed.decoder.layers)
    assert backend == "local" and isinstance(attn1, DotProductAttention)
    assert attn1.scale_mask_softmax.window_size == (4, 0) and attn2.scale_mask_softmax.window_size is None
    assert isinstance(attn1.softmax_offset, torch.nn.Parameter) and attn1.softmax_scale == pytest.approx(0.3)
    with torch.no_grad():
        a, b = _logits(windowed), _logits(full)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_yarn_and_gated_activations_without_mla(mcore_tp1) -> None:
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    model, _ = _model('model.rope_scaling="yarn"', "model.rope_scaling_factor=4.0", "model.rope_beta_fast=16.0",
                      "model.rope_original_max_position_embeddings=8", "model.activation=quick_gelu",
                      "model.glu_linear_offset=1.0", "model.activation_func_clamp_value=7.0")
    config = model.config
    assert isinstance(model.rotary_pos_emb, YarnRotaryEmbedding) and model.rotary_pos_emb.beta_fast == 16.0
    assert (config.yarn_rotary_scaling_factor, config.yarn_original_max_position_embeddings) == (4.0, 8)
    assert config.activation_func is quick_gelu
    assert (config.glu_linear_offset, config.activation_func_clamp_value) == (1.0, 7.0)
    with torch.no_grad():
        assert torch.isfinite(_logits(model)).all()


def test_zero_centered_norms_compute_one_plus_w(mcore_tp1) -> None:
    """Zero-centred weights w - 1 give the same model as plain norms with weights w."""
    from recipec.runtime.layer_spec import ZeroCenteredNorm

    common = ("model.qk_layernorm=true", "model.activation=gelu_tanh")
    plain, _ = _model(*common)
    centred, _ = _model(*common, "model.layernorm_zero_centered_gamma=true")
    assert isinstance(centred.decoder.final_layernorm, ZeroCenteredNorm)
    assert isinstance(centred.decoder.layers[0].self_attention.q_layernorm, ZeroCenteredNorm)
    with torch.no_grad():
        for name, p in plain.named_parameters():  # random norm weights, so that (1 + w) is really tested
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {k: (v - 1 if "norm" in k else v) for k, v in plain.state_dict().items()}
    centred.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(_logits(plain), _logits(centred), atol=1e-5)


def test_family_hooks_are_applied(mcore_tp1, monkeypatch: pytest.MonkeyPatch) -> None:
    from recipec.runtime import families

    seen = []
    gpt = families.get("gpt")
    hooked = dataclasses.replace(gpt, config_kwargs=lambda m: {"layernorm_epsilon": 1e-3, "not_a_field": 1},
                                 model_kwargs=lambda m: {"share_embeddings_and_output_weights": True},
                                 post_build=lambda model, m: seen.append(m.architecture))
    monkeypatch.setitem(families._registry(), "gpt", hooked)
    model, _ = _model()
    assert seen == ["gpt"] and model.config.layernorm_epsilon == 1e-3
    assert model.share_embeddings_and_output_weights


def test_every_compiler_family_has_a_runtime_half() -> None:
    from recipec.compiler import families as compiler_families
    from recipec.runtime import families

    assert {f.name for f in compiler_families.all_families()} == {f.name for f in families.all_families()}
