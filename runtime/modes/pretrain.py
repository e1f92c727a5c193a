"""train.mode = "pretrain": next-token loss on every token (mock, indexed or text data)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .base import Batch, LossFunc, TrainingMode, masked_mean_loss


class Pretrain(TrainingMode):
    name = "pretrain"

    def build_data(self) -> None:
        from ..data import build_datasets
        from ..tokenizer import build_tokenizer

        c = self.config
        self.train_data, self.valid_data = build_datasets(c, build_tokenizer(c), self.context.out_dir / "data")

    def microbatches(self, split: str, index: int) -> list[Batch]:
        from ..data import step_microbatches

        dataset = self.train_data if split == "train" else self.valid_data
        return step_microbatches(dataset, index, self.config, self.context.device)

    def forward_step(self, data_iterator: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, masked_mean_loss(batch["loss_mask"])


MODE = Pretrain
