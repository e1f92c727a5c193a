"""Preference pairs for train.mode = "dpo": jsonl records, one pair per line.

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}   (prompt optional)

(blank lines are skipped). A side's sequence is the prompt followed by the answer and
end-of-text; its log-prob is summed over the answer's tokens and that end-of-text only. The
string form tokenizes prompt and answer separately and concatenates them (put any template in
the strings, as for SFT records). The messages form renders prompt + answer as one
conversation with runtime/sft.py's renderer (the tokenizer's chat template when it has one);
the trained tokens are the answer's assistant turns, not any assistant turn of the prompt.

A side longer than seq_length + 1 tokens is truncated at the end; a pair where either side
keeps no answer token is dropped (both counted and logged). The pairs of all files are
shuffled with train.seed and split by data.split, each epoch reshuffled (seed + epoch), so
pair i of a split is a pure function of (data, tokenizer, seq_length, seed, i): resume by step
is exact. Files are read and tokenized on every rank at start (no cache: preference sets are
small next to pretraining corpora).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from ..sft import SFTDataError, _fail, _render_messages, _split_counts, _str

log = logging.getLogger("recipec.runtime")

Side = tuple[list[int], list[int]]  # (ids, target): target 1 where the token is part of the answer


def _messages(path: str, line: int, value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _fail(path, line, f'"{name}" must be a list of {{"role": ..., "content": ...}} here')
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _fail(path, line, f'{name}[{j}] must be an object with "role" and "content"')
        _str(path, line, m["role"], f"{name}[{j}].role")
        _str(path, line, m["content"], f"{name}[{j}].content")
    return value


def _spans(target: list[int]) -> list[int]:
    """Start index of every run of 1s in target."""
    return [i for i, t in enumerate(target) if t and (i == 0 or not target[i - 1])]


def _side(path: str, line: int, prompt: Any, answer: Any, name: str, tokenizer: Any) -> Side:
    if isinstance(answer, str):
        if not isinstance(prompt, str):
            raise _fail(path, line, f'"{name}" is a string, so "prompt" must be a string too')
        p, a = tokenizer.tokenize(prompt), tokenizer.tokenize(answer)
        return p + a + [tokenizer.eod], [0] * len(p) + [1] * len(a) + [1]
    answer = _messages(path, line, answer, name)
    if not any(m["role"] == "assistant" for m in answer):
        raise _fail(path, line, f'no message of "{name}" has role "assistant", so it has no answer to score')
    head = [] if prompt is None else _messages(path, line, prompt, "prompt")
    ids, target = _render_messages(path, line, head + answer, tokenizer)
    earlier = sum(m["role"] == "assistant" for m in head)
    spans = _spans(target)
    if earlier and len(spans) > earlier:  # the prompt's own assistant turns are context, not the answer
        cut = spans[earlier]
        target = [0] * cut + target[cut:]
    return ids + [tokenizer.eod], target + [1]


def parse_pair(path: str, line: int, text: str, tokenizer: Any) -> tuple[Side, Side]:
    """(chosen, rejected) of one jsonl record."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _fail(path, line, "JSON nested deeper than Python can read") from None
    if not isinstance(record, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing or ("prompt" not in record and isinstance(record.get("chosen"), str)):
        keys = ", ".join(sorted(record)) or "none"
        raise _fail(path, line, 'train.mode "dpo" reads {"prompt", "chosen", "rejected"} records (or their '
                    f"messages form); got keys: {keys}")
    prompt = record.get("prompt")
    return (_side(path, line, prompt, record["chosen"], "chosen", tokenizer),
            _side(path, line, prompt, record["rejected"], "rejected", tokenizer))


@dataclass(frozen=True)
class Pairs:
    """Every file's pairs: pair k is sides[2k] (chosen) and sides[2k + 1] (rejected), each (ids, target)
    truncated to seq_length + 1 tokens; `order` is the seeded shuffle (train first, then valid)."""

    sides: list[tuple[numpy.ndarray, numpy.ndarray]]
    order: numpy.ndarray
    n_train: int
    n_valid: int
    pad: int


def load_pairs(paths: list[str], tokenizer: Any, seq_length: int, split: str, seed: int) -> Pairs:
    sides: list[tuple[numpy.ndarray, numpy.ndarray]] = []
    truncated = dropped = 0
    limit = seq_length + 1
    for path in paths:
        if not Path(path).is_file():
            raise SFTDataError(f"dpo data: no jsonl file at {path!r} (data.paths; paths are relative to the "
                               "directory the run starts in)")
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                pair = parse_pair(path, number, text, tokenizer)
                truncated += sum(len(ids) > limit for ids, _ in pair)
                cut = [(ids[:limit], target[:limit]) for ids, target in pair]
                if not all(any(target[1:]) for _, target in cut):  # target[0] is never a label
                    dropped += 1
                    continue
                sides += [(numpy.asarray(ids, dtype=numpy.int64), numpy.asarray(t, dtype=numpy.float32))
                          for ids, t in cut]
    n = len(sides) // 2
    n_train, n_valid, n_test = _split_counts(n, split)
    if truncated or dropped:
        log.warning(f"dpo data: {truncated} sequence(s) longer than seq_length + 1 = {limit} tokens were "
                    f"truncated at the end; {dropped} pair(s) had no answer token left on a side and were dropped")
    log.info(f"dpo data: {n} preference pairs from {len(paths)} file(s) -> train {n_train}, valid {n_valid}, "
             f"test {n_test} (data.split={split!r}); chosen and rejected in the same microbatch")
    if n_train == 0:
        raise SFTDataError(f"dpo data: the train split of {n} pairs is empty (data.split={split!r}, data.paths)")
    order = numpy.random.RandomState(seed % 2**32).permutation(n)
    return Pairs(sides, order, n_train, n_valid, getattr(tokenizer, "pad", tokenizer.eod))


class PairDataset:
    """One split: item i is pair perm_{i // n}[i % n] as two padded rows (chosen, rejected)."""

    def __init__(self, pairs: Pairs, members: numpy.ndarray, seq_length: int, seed: int) -> None:
        self.pairs, self.members, self.seq_length, self.seed = pairs, members, seq_length, seed
        self._perms: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return len(self.members)

    def pair_index(self, i: int) -> int:
        n = len(self.members)
        epoch, j = divmod(i, n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = numpy.random.RandomState((self.seed + epoch) % 2**32).permutation(n)
        return int(self.members[perm[j]])

    def row(self, side: int) -> dict[str, torch.Tensor]:
        ids_np, target_np = self.pairs.sides[side]
        ids, target = torch.from_numpy(ids_np), torch.from_numpy(target_np)
        s, used = self.seq_length, len(ids_np) - 1
        tokens = torch.full((s,), self.pairs.pad, dtype=torch.int64)
        labels = torch.full((s,), self.pairs.pad, dtype=torch.int64)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        tokens[:used], labels[:used], loss_mask[:used] = ids[:-1], ids[1:], target[1:]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def microbatch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pairs `indices` (split positions) as one microbatch: the chosen rows, then the rejected rows."""
        ks = [self.pair_index(i) for i in indices]
        rows = [self.row(2 * k) for k in ks] + [self.row(2 * k + 1) for k in ks]
        batch = {key: torch.stack([r[key] for r in rows]) for key in ("tokens", "labels", "loss_mask")}
        batch["position_ids"] = torch.arange(self.seq_length, dtype=torch.int64).expand(len(rows), -1).contiguous()
        return batch
