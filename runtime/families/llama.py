"""Llama and Mistral at run time: the shared decoder table, nothing else of their own."""

from __future__ import annotations

from ._decoder import COMMON, DENSE_MLP
from .base import RuntimeFamily

FAMILIES = (
    RuntimeFamily(name="llama", weights=COMMON + DENSE_MLP),
    RuntimeFamily(name="mistral", weights=COMMON + DENSE_MLP),
)
