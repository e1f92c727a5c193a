"""SDPA core attention for Megatron-Core's *local* (non-Transformer-Engine) layer spec.

Megatron's local ``DotProductAttention`` materialises the full [b, np, sq, sk] score
matrix, builds its causal mask with ``device='cuda'`` and goes through
``FusedScaleMaskSoftmax``.  Without Transformer Engine (CPU boxes, CI) we want the same
module slot filled by ``torch.nn.functional.scaled_dot_product_attention``: it is fused on
every backend, needs no mask tensor for causal attention, and is device agnostic.

``SDPAttention`` keeps ``DotProductAttention``'s constructor and forward signatures so it
can be dropped into ``SelfAttentionSubmodules.core_attention``.  Layouts follow Megatron:
inputs are [seq, batch, heads, head_dim] with *per tensor-parallel rank* head counts, the
output is [seq, batch, heads * head_dim].  Grouped-query attention (fewer key/value heads
than query heads) is handled by repeating each kv head over its query group, which matches
Megatron's grouping (query head i belongs to group i // (heads / groups)).

Masks are a composition: each part says where a query may attend a key (a boolean [sq, sk]
or broadcastable tensor), and the parts are and-ed (`allowed`). Today the parts are causal
order and document boundaries (packed sequences, Megatron's THD layout with cu_seqlens: a
token attends only within its own example, as Transformer Engine does). A sliding window or
attention sinks add a part function here and one line in `SDPAttention._mask_parts`. Causal
attention alone takes SDPA's `is_causal` path and builds no mask tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


def causal(sq: int, sk: int, device: torch.device) -> Tensor:
    """Query i (the last sq of sk positions) may attend keys up to its own position."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


def document_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """Segment index of every token of a packed sequence, from its cumulative lengths."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def same_document(doc_q: Tensor, doc_k: Tensor) -> Tensor:
    """Query and key belong to the same packed example."""
    return doc_q[:, None] == doc_k[None, :]


def allowed(parts: list[Tensor]) -> Tensor | None:
    """Where attention is allowed under every part (None: no part, attend everywhere)."""
    mask = None
    for part in parts:
        mask = part if mask is None else mask & part
    return mask


class SDPAttention(MegatronModule):
    """Drop-in replacement for ``DotProductAttention`` backed by PyTorch SDPA.

    Args mirror megatron.core.transformer.dot_product_attention.DotProductAttention
    (0.16: config, layer_number, attn_mask_type, attention_type, attention_dropout,
    softmax_scale, cp_comm_type, pg_collection; older/newer releases pass
    ``model_comm_pgs`` or extra keywords, which are accepted and ignored because head
    counts are read from the incoming tensors rather than from process groups).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise NotImplementedError("SDPAttention does not implement context parallelism")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError("SDPAttention supports only softmax_type='vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("SDPAttention does not implement sliding windows")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling only divides then re-multiplies by layer_number inside
        # Megatron's fp16 softmax; mathematically the scale stays 1/sqrt(head_dim).
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Megatron's attention modules expose this for qk-clip; keep the attribute present.
        self.current_max_attn_logits = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """Attention over [sq, b, np, hn] query and [sk, b, ng, hn] key/value, or over packed
        [t, np, hn] (THD, one row) with `packed_seq_params.cu_seqlens_*`."""
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(f"packed sequences in {packed_seq_params.qkv_format!r} layout; "
                                          "SDPAttention reads 'thd'")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, n_q, hn = query.shape
        n_kv = key.shape[2]
        if n_q % n_kv != 0:
            raise ValueError(f"query heads {n_q} not a multiple of kv heads {n_kv}")

        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if n_kv != n_q:  # GQA: kv head g serves query heads [g*r, (g+1)*r)
            rep = n_q // n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)

        is_causal = mask_type == AttnMaskType.causal
        parts = self._mask_parts(sq, key.shape[0], query.device, mask_type, attention_mask, packed_seq_params)
        attn_mask = None
        if parts:  # causal order joins the other parts in one boolean mask
            attn_mask = allowed(([causal(sq, key.shape[0], query.device)] if is_causal else []) + parts)
            is_causal = False
        dropout_p = self.dropout_p if self.training else 0.0

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=self.softmax_scale,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG discipline as DotProductAttention: heads are TP-sharded, so dropout
            # draws from the per-TP-rank model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_q * hn)

    @staticmethod
    def _mask_parts(sq: int, sk: int, device: torch.device, mask_type: AttnMaskType,
                    attention_mask: Tensor | None, packed_seq_params: Any) -> list[Tensor]:
        """The mask parts besides causal order (see the module doc); empty for plain causal attention."""
        parts = []
        if attention_mask is not None and mask_type != AttnMaskType.causal:
            # Megatron masks are True where attention is *not* allowed; SDPA wants the opposite.
            parts.append(~attention_mask.bool())
        if packed_seq_params is not None:
            cu_q = packed_seq_params.cu_seqlens_q_padded
            cu_k = packed_seq_params.cu_seqlens_kv_padded
            cu_q = packed_seq_params.cu_seqlens_q if cu_q is None else cu_q
            cu_k = packed_seq_params.cu_seqlens_kv if cu_k is None else cu_k
            parts.append(same_document(document_ids(cu_q.to(device), sq), document_ids(cu_k.to(device), sk)))
        return parts
