"""What a training mode's runtime half is, and what it is given.

A mode is built once per rank, after the process group and before the model (so that a mode
with a frozen extra model, a DPO reference or a distillation teacher, can build it beside the
trained one in `build_extra_models`). The shared loop then asks it, per step, for this rank's
microbatches and hands them to Megatron-Core's pipeline schedule with the mode's
`forward_step`. The mode owns its batch layout: the loop never looks inside a batch.

`metrics` names what the loss function reports per microbatch: the first is the loss the
run logs and checks; the rest (e.g. DPO's reward accuracy) are averaged the same way, over
microbatches and data-parallel ranks, and written to metrics.jsonl next to the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from recipec.compiler.plan import Plan
from recipec.compiler.schema import RecipeConfig

Batch = dict[str, Any]
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Context:
    """What every mode may read: the compiled artifact and where this rank runs."""

    config: RecipeConfig
    plan: Plan
    device: torch.device
    on_gpu: bool
    out_dir: Path


class TrainingMode:
    """The runtime half of one training mode; subclasses override what differs."""

    name = "?"
    metrics: tuple[str, ...] = ("lm loss",)

    def __init__(self, context: Context) -> None:
        from recipec.compiler.modes import options

        self.context = context
        self.config = context.config
        self.options = options(context.config)  # the mode's own keys ([train.mode_options]), or None
        self.train_data: Any = None
        self.valid_data: Any = None

    def build_extra_models(self, trained: list[Any]) -> None:
        """Frozen models beside the trained chunks (`trained`, DDP-wrapped); none by default."""

    def build_data(self) -> None:
        """Tokenizer and the train/valid datasets (sets self.train_data and self.valid_data)."""
        raise NotImplementedError

    def events(self) -> list[dict[str, Any]]:
        """Records for metrics.jsonl once the data is built (e.g. SFT packing's efficiency)."""
        return []

    def microbatches(self, split: str, index: int) -> list[Batch]:
        """This data-parallel rank's microbatches of global batch `index` of `split` ("train" or
        "valid"), on the device. A pure function of (artifact, index): resume by step is exact."""
        raise NotImplementedError

    def forward_step(self, data_iterator: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        """Megatron-Core's forward step: the model's output and the function that turns it into
        (loss, {metric: value}) with a value for every name in `metrics`."""
        raise NotImplementedError


def masked_mean_loss(mask: torch.Tensor, name: str = "lm loss") -> LossFunc:
    """The loss function of next-token training: mean per-token loss under `mask` (0/1)."""
    mask = mask.float()

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {name: loss.detach().clone()}

    return loss_func
