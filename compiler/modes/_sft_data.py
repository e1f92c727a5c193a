"""Data rules every mode that reads jsonl records shares (sft, dpo); a helper, not a mode.

The leading underscore keeps plug-in discovery (compiler/plugins.plugin_modules) from taking
this module for a `train.mode`. What is said about the files themselves (every path ends in
.jsonl, no blend weights, a real tokenizer) is checked once for data.kind "sft" in
compiler/validate.io; here only what a mode adds: that it needs that reader at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import Finding

JSONL_HINT = 'set data.kind="sft" and data.paths to your *.jsonl files'


def needs_jsonl(config: RecipeConfig, mode: str, records: str) -> Iterator[Finding]:
    """Refuse a data.kind other than "sft" (the jsonl reader) for train.mode `mode`, which reads
    `records` (how the message names them, e.g. "jsonl prompt/response or messages records")."""
    kind = config.data.kind
    if kind != "sft":
        yield ("data.kind", f'train.mode "{mode}" reads {records}, but data.kind is {kind!r}', JSONL_HINT)
