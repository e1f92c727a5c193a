"""train.mode = "sft": jsonl records (runtime/sft.py), loss on the response tokens only.

One example per padded sequence by default; with `data.packing = true` several per sequence,
each attending only to itself (runtime/modes/sft_packing.py). Either way the loss of a
microbatch is the mean per-token loss over its response tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .base import Batch, LossFunc, TrainingMode, masked_mean_loss

log = logging.getLogger("recipec.runtime")


class SFT(TrainingMode):
    name = "sft"

    def build_data(self) -> None:
        from ..data import run_sizes
        from ..sft import SFTDataError, build_sft_datasets, load_examples
        from ..tokenizer import build_tokenizer

        c, d = self.config, self.config.data
        tokenizer = build_tokenizer(c)
        cache = Path(d.cache_dir) if d.cache_dir else self.context.out_dir / "data" / "sft_cache"
        sizes, s = run_sizes(c), c.model.seq_length
        if d.packing:
            from .sft_packing import PackedSFTDataset

            ex = load_examples(list(d.paths), tokenizer, s, d.split, c.train.seed, cache,
                               f"packed into sequences of {s} tokens")
            self.train_data = PackedSFTDataset(ex, ex.train, s, c.train.seed + 1, sizes[0], cache)
            self.valid_data = (PackedSFTDataset(ex, ex.valid, s, c.train.seed + 2, sizes[1], cache)
                               if ex.n_valid else None)
            self.packing_events = []
            for name, data in (("train", self.train_data), ("valid", self.valid_data)):
                if data is None:
                    continue
                unpacked = float(data.lengths.sum()) / max(1, len(data.examples) * s)
                log.info(f"sft packing ({name}): {len(data.examples):,} examples in {data.rows:,} sequences of {s} "
                         f"tokens, {100 * data.efficiency:.1f}% of tokens are not padding (one per sequence: "
                         f"{100 * unpacked:.1f}%)")
                self.packing_events.append({"event": "packing", "split": name, "examples": len(data.examples),
                                            "sequences": data.rows, "efficiency": data.efficiency,
                                            "unpacked_efficiency": unpacked})
        else:
            self.train_data, self.valid_data = build_sft_datasets(list(d.paths), tokenizer, s, d.split, c.train.seed,
                                                                  cache, sizes)
        if self.valid_data is None and c.train.eval_interval:
            raise SFTDataError(f"sft data: the valid split is empty (data.split={d.split!r} over "
                               f"{len(self.train_data.examples)}+ examples) but train.eval_interval is set; give the "
                               "valid share more weight, or unset train.eval_interval (~train.eval_interval)")

    def events(self) -> list[dict[str, Any]]:
        return list(getattr(self, "packing_events", []))

    def microbatches(self, split: str, index: int) -> list[Batch]:
        from ..data import step_microbatches

        dataset = self.train_data if split == "train" else self.valid_data
        collate = None
        if self.config.data.packing:
            from .sft_packing import collate_packed as collate
        return step_microbatches(dataset, index, self.config, self.context.device, collate=collate)

    def forward_step(self, data_iterator: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data_iterator)
        packed = None
        if "cu_seqlens" in batch:
            from .sft_packing import packed_seq_params

            packed = packed_seq_params(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
        return output, masked_mean_loss(batch["loss_mask"])


MODE = SFT
