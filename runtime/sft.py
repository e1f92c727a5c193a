"""Supervised finetuning data (`data.kind = "sft"`): jsonl records, loss on the responses only.

Each line of each file in `data.paths` is one JSON object, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}

(blank lines are skipped). An example's token ids are the prompt's followed by the response's
and end-of-text; the loss covers the response tokens and that end-of-text, nothing else.

- prompt/response: the two strings are tokenized separately and concatenated, with nothing
  added between them (put any separator or template in the strings themselves).
- messages, with a Hugging Face tokenizer that has a chat template: `apply_chat_template`
  renders the whole conversation; the loss covers each assistant turn, located by rendering
  the conversation up to that turn (with the generation prompt) and up to its end. Templates
  that re-render earlier turns differently later (not prefix-consistent) are refused.
- messages otherwise (byte tokenizer, HF tokenizer without a template): each message is
  rendered as `<|{role}|>\\n{content}\\n`; the loss covers the content of assistant messages and
  the newline after it (so the model learns where a turn ends), and the final end-of-text.

By default one example per sequence, padded to `model.seq_length` (loss_mask 0 on the padding):
position ids 0..s-1 are exact and causal attention never sees the padding; the cost is compute
on the padding (the log says what fraction of tokens is not padding). `data.packing = true`
packs several examples into each sequence instead (runtime/modes/sft_packing.py). An example
longer than seq_length + 1 tokens is truncated at the end; one whose response is cut away
entirely carries no loss and is dropped. Both are counted and logged once.

The examples of all files are concatenated, shuffled with `train.seed` and split into train /
valid / test by `data.split`; each epoch over a split is shuffled again (seed + epoch), so
sample i of a split is a pure function of (data, tokenizer, seq_length, seed, i) and resume by
step stays exact. Tokenized files are cached under the run's data directory (or
`data.cache_dir`), named by the file's content key, the tokenizer's identity (its files' content
for an HF tokenizer) and seq_length (runtime/cache.py): an edited file is tokenized again, an
unchanged copy is not. Rank 0 builds, the others wait and read the same file; a cache entry that
cannot be read back is rebuilt. Cache files are plain .npz arrays, loaded with allow_pickle=False.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
from recipec.compiler.errors import RecipeError

from .cache import build_once, content_key, short_hash, temp_path
from .logs import Progress

log = logging.getLogger("recipec.runtime")

_VERSION = 2  # bump when the cached arrays or their key change meaning
_ARRAYS = ("ids", "target", "offsets", "lines", "truncated", "dropped")


class SFTDataError(RecipeError):
    """A malformed sft jsonl file."""


def _fail(path: str, line: int, what: str) -> SFTDataError:
    return SFTDataError(f"{path}:{line}: {what}")


def _str(path: str, line: int, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, line, f"{name} must be a string, got {type(value).__name__}")
    return value


def _chat_template(tokenizer: Any) -> Any:
    """The HF tokenizer object when it has a chat template, else None."""
    hf = getattr(tokenizer, "hf", None)
    return hf if hf is not None and getattr(hf, "chat_template", None) else None


def _render_messages(path: str, line: int, messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, target) of a conversation: target[i] = 1 where ids[i] is trained on."""
    hf = _chat_template(tokenizer)
    if hf is None:
        ids: list[int] = []
        target: list[int] = []
        for m in messages:
            head = tokenizer.tokenize(f"<|{m['role']}|>\n")
            body = tokenizer.tokenize(f"{m['content']}\n")
            ids += head + body
            target += [0] * len(head) + [1 if m["role"] == "assistant" else 0] * len(body)
        return ids, target

    def render(upto: int, generation_prompt: bool) -> list[int]:
        try:
            out = hf.apply_chat_template(messages[:upto], tokenize=True, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - the template's own checks (jinja2 raise_exception, ...)
            raise _fail(path, line, f"the tokenizer's chat template refused this conversation "
                        f"({type(exc).__name__}: {exc})") from None
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
            out = out["input_ids"]
        return [int(i) for i in out]

    ids = render(len(messages), False)
    target = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(k, True), render(k + 1, False)
        if ids[:len(start)] != start or ids[:len(end)] != end:
            raise _fail(path, line, "the tokenizer's chat template does not render this conversation "
                        "prefix-consistently, so the assistant turns cannot be located; use "
                        '{"prompt": ..., "response": ...} records rendered by yourself')
        for i in range(len(start), len(end)):
            target[i] = 1
    if ids and ids[-1] == tokenizer.eod:  # the template ends with end-of-text already: eod is added below
        ids, target = ids[:-1], target[:-1]
    return ids, target


def parse_line(path: str, line: int, text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, target) of one jsonl record, end-of-text appended and trained on."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _fail(path, line, "JSON nested deeper than Python can read; a record is an object of strings "
                    "(and a list of message objects)") from None
    if not isinstance(record, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _fail(path, line, '"messages" must be a non-empty list of {"role": ..., "content": ...}')
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise _fail(path, line, f'messages[{j}] must be an object with "role" and "content"')
            _str(path, line, m["role"], f"messages[{j}].role")
            _str(path, line, m["content"], f"messages[{j}].content")
        if not any(m["role"] == "assistant" for m in messages):
            raise _fail(path, line, 'no message has role "assistant", so there is nothing to train on')
        ids, target = _render_messages(path, line, messages, tokenizer)
    elif "prompt" in record or "response" in record:
        missing = [k for k in ("prompt", "response") if k not in record]
        if missing:
            raise _fail(path, line, f'missing "{missing[0]}" (records are {{"prompt": ..., "response": ...}} '
                        'or {"messages": [...]})')
        prompt = tokenizer.tokenize(_str(path, line, record["prompt"], '"prompt"'))
        response = tokenizer.tokenize(_str(path, line, record["response"], '"response"'))
        ids, target = prompt + response, [0] * len(prompt) + [1] * len(response)
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise _fail(path, line, f'expected "prompt" and "response", or "messages"; got keys: {keys}')
    return ids + [tokenizer.eod], target + [1]


def tokenize_file(path: str, tokenizer: Any, seq_length: int, progress: Progress | None = None) -> dict[str, Any]:
    """Every record of one file, truncated to seq_length + 1 tokens, as flat arrays (`progress` hears
    of each line read, and logs while a large file is being read)."""
    ids_all: list[int] = []
    target_all: list[int] = []
    offsets = [0]
    lines: list[int] = []
    truncated = dropped = 0
    limit = seq_length + 1  # tokens[:-1] are the inputs, tokens[1:] the labels
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below; only open() may fail here)
    except OSError as exc:
        raise SFTDataError(f"cannot read sft data file {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if progress is not None:
                progress.update(number)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(path, number, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            ids, target = parse_line(path, number, text, tokenizer)
            if len(ids) > limit:
                truncated += 1
                ids, target = ids[:limit], target[:limit]
            if not any(target[1:]):  # the first token is never a label
                dropped += 1
                continue
            ids_all += ids
            target_all += target
            offsets.append(len(ids_all))
            lines.append(number)
    if len(offsets) == 1:
        raise SFTDataError(f"{path}: no usable records (empty file, or every response was truncated away "
                           f"at seq_length {seq_length})")
    return {"ids": numpy.asarray(ids_all, dtype=numpy.int32), "target": numpy.asarray(target_all, dtype=numpy.uint8),
            "offsets": numpy.asarray(offsets, dtype=numpy.int64), "lines": numpy.asarray(lines, dtype=numpy.int64),
            "truncated": numpy.int64(truncated), "dropped": numpy.int64(dropped)}


def _cache_path(path: str, tokenizer: Any, seq_length: int, cache_dir: Path) -> Path:
    """Named by what the arrays depend on: the file's content, the tokenizer, seq_length (not the path)."""
    ident = short_hash(_VERSION, content_key(path), seq_length, sorted(tokenizer.unique_identifiers.items()))
    return cache_dir / f"{Path(path).stem}_{ident}_sft.npz"


def _build_cache(path: str, tokenizer: Any, seq_length: int, target: Path) -> None:
    progress = Progress(f"tokenizing sft file {path}", unit="lines")
    arrays = tokenize_file(path, tokenizer, seq_length, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target, ".npz")
    try:
        numpy.savez(tmp, **arrays)
        os.replace(tmp, target)
    finally:  # a failed write (a full disk) leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
    log.info(f"tokenized sft file {path}: {len(arrays['offsets']) - 1:,} examples, {len(arrays['ids']):,} tokens "
             f"in {progress.elapsed()} (cached at {target})")


def _read_cache(target: Path) -> dict[str, Any] | None:
    """The arrays of a cache entry, or None if it is missing or cannot be read back (then rebuilt)."""
    try:
        with numpy.load(target, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if set(arrays) == set(_ARRAYS) else None


def load_tokenized(paths: list[str], tokenizer: Any, seq_length: int, cache_dir: Path) -> list[dict[str, Any]]:
    """The tokenized arrays of each file; built once by rank 0 (errors raised on every rank)."""
    for p in paths:
        if not os.path.isfile(p):
            raise SFTDataError(f"sft data file {p} does not exist (data.paths)")
    try:
        targets = [_cache_path(p, tokenizer, seq_length, cache_dir) for p in paths]
    except OSError as exc:
        raise SFTDataError(f"cannot read sft data file {exc.filename}: {exc.strerror}") from None

    def ready() -> bool:
        return all(t.exists() for t in targets)

    built: set[Path] = set()

    def build() -> None:
        for p, t in zip(paths, targets):
            if not t.exists():
                _build_cache(p, tokenizer, seq_length, t)
                built.add(t)

    build_once(ready, build)
    for p, t in zip(paths, targets):
        if t not in built:  # (the other ranks say so too, but only rank 0 logs INFO)
            log.info(f"reused cached sft tokens {t} for {p}")
    out = []
    for p, t in zip(paths, targets):
        arrays = _read_cache(t)
        if arrays is None:  # damaged on disk: this rank tokenizes again (and replaces the entry)
            log.warning(f"sft cache {t} could not be read back; tokenizing {p} again")
            _build_cache(p, tokenizer, seq_length, t)
            arrays = _read_cache(t)
            if arrays is None:
                raise SFTDataError(f"cannot write a readable sft cache at {t}; check that directory "
                                   "(data.cache_dir) and its file system")
        out.append(arrays)
    return out


def _split_counts(n: int, split: str) -> tuple[int, int, int]:
    weights = [float(x) for x in split.split(",")]
    total = sum(weights) or 1.0
    n_train = round(n * weights[0] / total)
    n_valid = min(n - n_train, round(n * weights[1] / total))
    return n_train, n_valid, n - n_train - n_valid


class SFTDataset(torch.utils.data.Dataset):
    """One split: sample i is example perm_{i // n}[i % n], padded to seq_length."""

    def __init__(self, ids: numpy.ndarray, target: numpy.ndarray, offsets: numpy.ndarray,
                 examples: numpy.ndarray, seq_length: int, pad: int, seed: int, num_samples: int) -> None:
        self.ids, self.target, self.offsets = ids, target, offsets
        self.examples = examples
        self.seq_length, self.pad, self.seed = seq_length, pad, seed
        n = len(examples)
        self.epochs = max(1, -(-num_samples // n)) if n else 0
        self._perms: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return self.epochs * len(self.examples)

    def example_index(self, i: int) -> int:
        n = len(self.examples)
        epoch, j = divmod(i, n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = numpy.random.RandomState((self.seed + epoch) % 2**32).permutation(n)
        return int(self.examples[perm[j]])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = self.example_index(i)
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        ids = torch.from_numpy(self.ids[a:b].astype(numpy.int64))
        target = torch.from_numpy(self.target[a:b].astype(numpy.float32))
        s, used = self.seq_length, b - a - 1
        tokens = torch.full((s,), self.pad, dtype=torch.int64)
        labels = torch.full((s,), self.pad, dtype=torch.int64)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        tokens[:used], labels[:used], loss_mask[:used] = ids[:-1], ids[1:], target[1:]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(s, dtype=torch.int64)}


@dataclass(frozen=True)
class Examples:
    """Every file's examples, concatenated: example k is ids[offsets[k]:offsets[k + 1]] (target: 1 where
    trained on); `order` is the seeded shuffle whose first n_train are the train split, next n_valid valid."""

    ids: numpy.ndarray
    target: numpy.ndarray
    offsets: numpy.ndarray
    order: numpy.ndarray
    n_train: int
    n_valid: int
    pad: int

    @property
    def train(self) -> numpy.ndarray:
        return self.order[:self.n_train]

    @property
    def valid(self) -> numpy.ndarray:
        return self.order[self.n_train:self.n_train + self.n_valid]

    def lengths(self, examples: numpy.ndarray) -> numpy.ndarray:
        """Input positions each example fills (its tokens less one: the last is only a label)."""
        return (self.offsets[examples + 1] - self.offsets[examples] - 1).astype(numpy.int64)


def load_examples(paths: list[str], tokenizer: Any, seq_length: int, split: str, seed: int, cache_dir: Path,
                  layout: str) -> Examples:
    """All files' examples, split and shuffled; `layout` only words the log line."""
    parts = load_tokenized(paths, tokenizer, seq_length, cache_dir)
    ids = numpy.concatenate([p["ids"] for p in parts])
    target = numpy.concatenate([p["target"] for p in parts])
    offsets, base = [numpy.zeros(1, dtype=numpy.int64)], 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    offsets_all = numpy.concatenate(offsets)
    n = len(offsets_all) - 1
    truncated = sum(int(p["truncated"]) for p in parts)
    dropped = sum(int(p["dropped"]) for p in parts)
    n_train, n_valid, n_test = _split_counts(n, split)
    if truncated or dropped:
        log.warning(f"sft data: {truncated} of {n + dropped} examples were longer than seq_length + 1 = "
                    f"{seq_length + 1} tokens and were truncated at the end; {dropped} had no response token "
                    f"left and were dropped")
    log.info(f"sft data: {n} examples from {len(paths)} file(s) -> train {n_train}, valid {n_valid}, "
             f"test {n_test} (data.split={split!r}); {layout}")
    if n_train == 0:
        raise SFTDataError(f"sft data: the train split of {n} examples is empty (data.split={split!r})")
    order = numpy.random.RandomState(seed % 2**32).permutation(n)
    pad = getattr(tokenizer, "pad", tokenizer.eod)
    return Examples(ids, target, offsets_all, order, n_train, n_valid, pad)


def build_sft_datasets(paths: list[str], tokenizer: Any, seq_length: int, split: str, seed: int,
                       cache_dir: Path, sizes: list[int]) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, valid) over all files' examples, one per padded sequence; valid is None when its split is empty."""
    ex = load_examples(paths, tokenizer, seq_length, split, seed, cache_dir,
                       f"one example per sequence, padded to {seq_length}")
    train = SFTDataset(ex.ids, ex.target, ex.offsets, ex.train, seq_length, ex.pad, seed + 1, sizes[0])
    valid = (SFTDataset(ex.ids, ex.target, ex.offsets, ex.valid, seq_length, ex.pad, seed + 2, sizes[1])
             if ex.n_valid else None)
    for name, dataset in (("train", train), ("valid", valid)):
        if dataset is not None:
            used = int(ex.lengths(dataset.examples).sum())
            log.info(f"sft {name} data: {100 * used / (len(dataset.examples) * seq_length):.1f}% of the tokens "
                     f"of its sequences are not padding (data.packing=true would pack them)")
    return train, valid
