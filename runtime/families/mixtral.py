"""Mixtral's weight table: the decoder with block_sparse_moe experts (w1/w3 gate/up, w2 down)."""

from __future__ import annotations

from ._decoder import COMMON, MIXTRAL_MOE
from .base import RuntimeFamily

FAMILIES = (RuntimeFamily(name="mixtral", weights=COMMON + MIXTRAL_MOE),)
