"""Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Qwen3-MoE (mlp.experts.*) weight tables."""

from __future__ import annotations

from ._decoder import COMMON, DENSE_MLP, QK_NORM, QKV_BIAS, QWEN_MOE
from .base import RuntimeFamily

FAMILIES = (
    RuntimeFamily(name="qwen2", weights=COMMON + QKV_BIAS + DENSE_MLP),
    RuntimeFamily(name="qwen3", weights=COMMON + QK_NORM + DENSE_MLP),
    RuntimeFamily(name="qwen3_moe", weights=COMMON + QK_NORM + QWEN_MOE),
)
