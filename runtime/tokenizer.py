"""Tokenizers with the interface Megatron-Core's datasets expect (vocab_size, eod, pad,
unique_identifiers, tokenize/detokenize).

`byte`: UTF-8 bytes 0..255 and end-of-text 256, needs nothing on disk, so the CPU
main job trains on real text with no download. `huggingface`: a local tokenizer
directory through transformers (offline). `null`: ids are the data (mock runs).

`unique_identifiers` names a tokenizer in data cache keys (text packs, SFT caches, Megatron's
index caches), so it says what the token ids depend on: for an HF directory, the content of its
files, not just its path (a tokenizer replaced in place must not reuse the old packs).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path
from typing import Any

from recipec.compiler.schema import RecipeConfig


class ByteTokenizer:
    vocab_size = 257
    eod = 256
    pad = 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "recipec.ByteTokenizer"})


class NullTokenizer:
    """Mock data: token ids 0..vocab_size-2, end-of-text the last id."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "recipec.NullTokenizer", "vocab_size": self.vocab_size})


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never downloads)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self._tok: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eod = eos if eos is not None else self.vocab_size - 1
        self.pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eod

    @property
    def hf(self) -> Any:
        """The transformers tokenizer itself (sft data uses its chat template, when it has one)."""
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "recipec.HFTokenizer", "path": self.path, "content": self._content})

    @functools.cached_property
    def _content(self) -> str:
        """Content keys of the directory's files (tokenizer.json, vocab, merges, config, chat template)."""
        from .cache import content_key, short_hash

        files = sorted(p for p in Path(self.path).iterdir() if p.is_file()) if Path(self.path).is_dir() else []
        return short_hash(*(f"{p.name}={content_key(p)}" for p in files))


def build_tokenizer(c: RecipeConfig) -> ByteTokenizer | NullTokenizer | HFTokenizer:
    t = c.tokenizer
    if t.type == "byte":
        return ByteTokenizer()
    if t.type == "huggingface":
        assert t.path is not None
        return HFTokenizer(t.path)
    return NullTokenizer(c.model.vocab_size)
