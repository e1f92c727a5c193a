"""Gemma 3's Megatron-Core pieces that no generic [model] field covers (runtime half of the gemma3 family).

What Gemma 3 does differently from a Llama-style decoder, and where it lives here:

- **zero-centred RMSNorm** `(x * rsqrt(mean(x^2) + eps)) * (1 + w)` in fp32, cast back (HF Gemma3RMSNorm):
  `GemmaRMSNorm` on the local path (Megatron's WrappedTorchNorm refuses zero-centred gamma);
  TE's RMSNorm with `zero_centered_gamma` (TransformerConfig.layernorm_zero_centered_gamma) on TE.
- **sandwich norms**: a norm on the attention output and on the MLP output before each residual add
  (HF post_attention_layernorm / post_feedforward_layernorm). They sit inside `linear_proj` /
  `linear_fc2` as `post_layernorm` (Megatron-Bridge's layout), applied by a forward *hook*, not in
  `forward`: recipec's LoRA subclasses the linear and adds its delta in `forward`, so the hook runs after
  it and the adapter lands before the norm, as a PEFT adapter on HF's o_proj/down_proj does.
- **separate local RoPE base**: `DualRotaryEmbedding` (installed by `post_build`) hands every layer
  the stacked (local, global) rotary angles; `Gemma3SelfAttention` keeps the local ones on its
  sliding-window layers (Megatron's `is_layer_window_attention`, 1-based global layer number) and the
  global ones (with the linear RoPE scaling, if any) elsewhere.
- **embedding scaling** by sqrt(hidden_size), cast to the embedding dtype first as HF does
  (`ScaledLanguageModelEmbedding`, swapped in by `post_build`).
- sliding windows, qk-norm, `softmax_scale` (query_pre_attn_scalar ** -0.5) and GeGLU are generic
  TransformerConfig fields; on the local path the sliding-window layers use Megatron's own
  `DotProductAttention` (it implements window_size / window_attn_skip_freq), on TE TE's attention.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.transformer.utils import is_layer_window_attention

# The local spec saves its separate norms under TE's fused names, so TE and local checkpoints agree.
_TE_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                 "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class GemmaRMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back; weight applied as (1 + w) when zero-centred (HF Gemma3RMSNorm)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered else torch.ones
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        # Replicated over TP; with sequence parallelism each rank sees part of the sequence, so
        # finalize_model_grads sums this weight's gradient over TP (as for Megatron's own norms).
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (h * (1.0 + w) if self.zero_centered else h * w).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered={self.zero_centered}"


def _post_norm_hook(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
    out, bias = output
    if bias is not None:  # validate refuses add_bias_linear for gemma3; a bias after the norm would be wrong
        raise RuntimeError("gemma3 post-norm linear with a bias: the norm must come after the bias")
    return module.post_layernorm(out), bias


class PostNormRowParallelLinear(RowParallelLinear):
    """Row-parallel linear whose output goes through `post_layernorm` (a Gemma sandwich norm)."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = GemmaRMSNorm(config, output_size, eps=config.layernorm_epsilon)
        self.register_forward_hook(_post_norm_hook)


def _te_post_norm_linear() -> type:
    """TE's row-parallel linear with a TE RMSNorm (zero-centred from the config) on its output."""
    from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear

    class TEPostNormRowParallelLinear(TERowParallelLinear):
        def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = TENorm(config, output_size, eps=config.layernorm_epsilon)
            self.register_forward_hook(_post_norm_hook)

    return TEPostNormRowParallelLinear


class Gemma3SelfAttention(SelfAttention):
    """Self-attention taking the local RoPE angles on sliding-window layers, the global ones elsewhere."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, rotary_pos_emb: Any = None, **kwargs: Any) -> Any:
        if isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 5:  # DualRotaryEmbedding's stack
            local = is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                              self.layer_number)
            rotary_pos_emb = rotary_pos_emb[0] if local else rotary_pos_emb[1]
        return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class DualRotaryEmbedding(torch.nn.Module):
    """GPTModel's rotary module for Gemma 3: returns stack(local angles, global angles).

    `global_rope` is the model's own RotaryEmbedding (global theta, linear scaling); `local_rope` the
    same but with the local theta and no scaling. Neither holds parameters, so checkpoints do not change.
    """

    def __init__(self, global_rope: RotaryEmbedding, local_rope: RotaryEmbedding) -> None:
        super().__init__()
        self.global_rope = global_rope
        self.local_rope = local_rope

    def get_rotary_seq_len(self, *args: Any, **kwargs: Any) -> int:
        return self.global_rope.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None) -> Any:
        local = self.local_rope(max_seq_len, offset, packed_seq, cp_group)
        return torch.stack([local, self.global_rope(max_seq_len, offset, packed_seq, cp_group)])


class ScaledLanguageModelEmbedding(LanguageModelEmbedding):
    """Token embeddings times sqrt(hidden_size), the factor rounded to the weights' dtype first (as HF does)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(*args, **kwargs)
        weight = self.word_embeddings.weight
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=weight.dtype, device=out.device)
        return out * scale.to(out.dtype)


def install_gemma3_modules(model: Any, *, rotary_base_local: float | None, scale_embeddings: bool) -> None:
    """Adjust a built GPTModel chunk: scaled embedding (first stage), dual RoPE (every stage)."""
    embedding = getattr(model, "embedding", None)
    if scale_embeddings and embedding is not None and type(embedding) is LanguageModelEmbedding:
        embedding.__class__ = ScaledLanguageModelEmbedding  # same parameters and state dict, scaled output
    rope = getattr(model, "rotary_pos_emb", None)
    if rotary_base_local is not None and isinstance(rope, RotaryEmbedding):
        cfg = model.config
        local = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0,
                                rotary_interleaved=cfg.rotary_interleaved, rotary_base=rotary_base_local,
                                use_cpu_initialization=cfg.use_cpu_initialization,
                                cp_group=getattr(rope, "cp_group", None))
        model.rotary_pos_emb = DualRotaryEmbedding(rope, local)


def gemma3_spec(*, te: bool, windowed: bool, config: Any, vp_stage: int | None = None) -> Any:
    """The Gemma 3 decoder spec: a TransformerLayer spec (TE) or, on the local path, a block spec
    with Gemma norms for this chunk's layers (`config`: the TransformerConfig, `vp_stage`: the chunk)."""
    if te:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
        )

        post_norm_linear = _te_post_norm_linear()
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=Gemma3SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear, core_attention=TEDotProductAttention,
                    linear_proj=post_norm_linear, q_layernorm=TENorm, k_layernorm=TENorm)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=post_norm_linear)),
            mlp_bda=get_bias_dropout_add,
        ))
    if windowed:
        core: Any = DotProductAttention  # Megatron's: implements window_size / window_attn_skip_freq
    else:
        from recipec.runtime.attention import SDPAttention

        core = SDPAttention
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=GemmaRMSNorm,
        self_attention=ModuleSpec(
            module=Gemma3SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear, core_attention=core, linear_proj=PostNormRowParallelLinear,
                q_layernorm=GemmaRMSNorm, k_layernorm=GemmaRMSNorm)),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=GemmaRMSNorm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=PostNormRowParallelLinear)),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=dict(_TE_NORM_KEYS),
    ))
    # A block spec, so the final norm is a GemmaRMSNorm too (the default, WrappedTorchNorm, refuses
    # zero-centred gamma); Megatron then builds exactly these layers for this chunk.
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=GemmaRMSNorm)
