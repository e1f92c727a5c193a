"""gpt: a generic Megatron GPT decoder; it has no Hugging Face weights (an empty table)."""

from __future__ import annotations

from .base import RuntimeFamily

FAMILIES = (RuntimeFamily(name="gpt", weights=()),)
