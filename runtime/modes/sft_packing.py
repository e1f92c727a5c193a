"""Packed SFT sequences (`data.packing = true`): several examples per sequence, none seeing another.

Packing. The examples of a split, in its seeded order, go into sequences of `seq_length`
input positions by best fit (each example into the fullest sequence that still has room for
it, else a new one; `bisect` over the remaining capacities). An example of n tokens fills n - 1
positions (inputs ids[:-1], labels ids[1:], shifted within the example, so no label crosses a
boundary); what a sequence has left over is padding with loss_mask 0. The rows are a pure
function of the examples' lengths in that order and seq_length, so the plan is cached under
a name derived from exactly those (`pack_<hash>.npz`, next to the tokenized files) and built
once by rank 0 (runtime/cache.py). Epochs reshuffle the rows (seed + epoch), not the packing.

Layout. A row carries `cu_seqlens` (int32, the cumulative example lengths, the trailing
padding as one more segment so it ends at seq_length) and `max_seqlen`; position ids restart
at 0 in every segment. The forward step turns them into Megatron's PackedSeqParams (qkv_format
"thd"): Transformer Engine attends within each segment and Megatron's RoPE restarts per
segment; on the local path runtime/attention.py builds the same block-diagonal causal mask.
One row per microbatch (the compiler requires train.micro_batch_size = 1).

Efficiency (non-padding tokens / all tokens of the rows) is logged and written to
metrics.jsonl as {"event": "packing", ...}.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy
import torch

from ..cache import build_once, short_hash, temp_path
from ..sft import Examples, SFTDataError

log = logging.getLogger("recipec.runtime")

_VERSION = 1  # bump when the cached plan changes meaning


def best_fit(lengths: numpy.ndarray, capacity: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(row_offsets, items): row r holds positions items[row_offsets[r]:row_offsets[r + 1]] of `lengths`."""
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    rows: list[list[int]] = []
    for i, length in enumerate(lengths.tolist()):
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    offsets = numpy.zeros(len(rows) + 1, dtype=numpy.int64)
    offsets[1:] = numpy.cumsum([len(r) for r in rows])
    items = numpy.asarray([i for r in rows for i in r], dtype=numpy.int64)
    return offsets, items


def cached_plan(lengths: numpy.ndarray, capacity: int, cache_dir: Path) -> tuple[numpy.ndarray, numpy.ndarray]:
    """best_fit(lengths, capacity), read from the cache when the same lengths were packed before."""
    digest = hashlib.sha256(numpy.ascontiguousarray(lengths, dtype=numpy.int64).tobytes()).hexdigest()
    target = cache_dir / f"pack_{short_hash(_VERSION, capacity, digest)}.npz"

    def build() -> None:
        offsets, items = best_fit(lengths, capacity)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(target, ".npz")
        try:
            numpy.savez(tmp, row_offsets=offsets, items=items)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    build_once(target.exists, build)
    for attempt in range(2):
        try:
            with numpy.load(target, allow_pickle=False) as z:
                return z["row_offsets"], z["items"]
        except (OSError, ValueError, KeyError, EOFError) as exc:
            if attempt:
                raise SFTDataError(f"cannot read back the packing plan {target} ({exc}); check data.cache_dir") from None
            log.warning(f"packing plan {target} could not be read back; packing again")
            build()
    raise AssertionError("unreachable")


class PackedSFTDataset(torch.utils.data.Dataset):
    """One split, packed: sample i is row perm_{i // R}[i % R] of the R packed rows."""

    def __init__(self, ex: Examples, examples: numpy.ndarray, seq_length: int, seed: int, num_samples: int,
                 cache_dir: Path) -> None:
        self.ex, self.examples, self.seq_length, self.seed = ex, examples, seq_length, seed
        self.lengths = ex.lengths(examples)
        self.row_offsets, self.items = cached_plan(self.lengths, seq_length, cache_dir)
        self.rows = len(self.row_offsets) - 1
        self.epochs = max(1, -(-num_samples // self.rows)) if self.rows else 0
        self._perms: dict[int, numpy.ndarray] = {}

    @property
    def efficiency(self) -> float:
        """Fraction of the rows' tokens that are not padding."""
        return float(self.lengths.sum()) / max(1, self.rows * self.seq_length)

    def __len__(self) -> int:
        return self.epochs * self.rows

    def row_index(self, i: int) -> int:
        epoch, j = divmod(i, self.rows)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = numpy.random.RandomState((self.seed + epoch) % 2**32).permutation(self.rows)
        return int(perm[j])

    def row_examples(self, r: int) -> list[int]:
        """The example indices (into the Examples arrays) packed into row r, in order."""
        return [int(self.examples[k]) for k in self.items[self.row_offsets[r]:self.row_offsets[r + 1]]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return pack_row(self.ex, self.row_examples(self.row_index(i)), self.seq_length)


def pack_row(ex: Examples, examples: list[int], seq_length: int) -> dict[str, Any]:
    """One packed sequence of these examples (see the module doc for the layout)."""
    s = seq_length
    tokens = torch.full((s,), ex.pad, dtype=torch.int64)
    labels = torch.full((s,), ex.pad, dtype=torch.int64)
    loss_mask = torch.zeros(s, dtype=torch.float32)
    position_ids = torch.zeros(s, dtype=torch.int64)
    bounds, pos = [0], 0
    for k in examples:
        a, b = int(ex.offsets[k]), int(ex.offsets[k + 1])
        n = b - a - 1
        ids = torch.from_numpy(ex.ids[a:b].astype(numpy.int64))
        tokens[pos:pos + n], labels[pos:pos + n] = ids[:-1], ids[1:]
        loss_mask[pos:pos + n] = torch.from_numpy(ex.target[a + 1:b].astype(numpy.float32))
        position_ids[pos:pos + n] = torch.arange(n)
        pos += n
        bounds.append(pos)
    if pos < s:  # the padding is a segment of its own: it attends only to itself and carries no loss
        position_ids[pos:] = torch.arange(s - pos)
        bounds.append(s)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max())}


def collate_packed(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One packed row as a microbatch of 1 ([1, s] tensors, cu_seqlens and max_seqlen as they are)."""
    if len(samples) != 1:
        raise SFTDataError(f"packed sequences go one per microbatch; got {len(samples)} (train.micro_batch_size)")
    (sample,) = samples
    out = {k: sample[k].unsqueeze(0) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    out["cu_seqlens"], out["max_seqlen"] = sample["cu_seqlens"], sample["max_seqlen"]
    return out


def packed_seq_params(batch: dict[str, Any]) -> Any:
    """Megatron-Core's THD description of a packed microbatch (TE attention and RoPE read it;
    runtime/attention.py turns it into a block-diagonal causal mask on the local path)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, m = batch["cu_seqlens"], batch["max_seqlen"]
    # The padded variants equal the plain ones: every token belongs to a segment (see pack_row).
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=m, max_seqlen_kv=m)
