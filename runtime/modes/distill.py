"""train.mode = "distill": the student learns the frozen teacher's next-token distribution.

The teacher (compiler/modes/distill.py: the student's [model] with the `teacher_*` keys) is a
second GPTModel built by runtime/model.py under the same parallel layout, its weights read once
from `teacher_load` (an HF directory through runtime/hf/convert.py, or a recipec checkpoint
through runtime/checkpoint.py), then frozen: eval mode, no gradients, never in the optimizer or
in a saved checkpoint. Each microbatch runs through the teacher (no_grad) and the student; the
loss (runtime/modes/distill_loss.py) mixes the student's LM loss with the KL between the two
temperature-softened distributions, over the vocab-parallel logits of the TP group.

The data and its batches are those of the mode that reads it: SFT records (loss and KL on the
response tokens, packed or padded) or pretraining text (every token). A resumed run rebuilds
the same teacher, so its losses continue those of the uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..hf.reader import is_hf_dir
from .base import Batch, Context, LossFunc, TrainingMode
from .distill_loss import distill_loss

log = logging.getLogger("recipec.runtime")


class Distill(TrainingMode):
    name = "distill"
    metrics = ("distill loss", "kl", "lm loss")

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        from .pretrain import Pretrain
        from .sft import SFT

        # The data side is the mode that reads this data kind; this class adds the teacher and the loss.
        self.data = SFT(context) if self.config.data.kind == "sft" else Pretrain(context)
        self.teacher: Any = None

    # ------------------------------------------------------------------ the teacher
    def build_extra_models(self, trained: list[Any]) -> None:
        from recipec.compiler.errors import RecipeError
        from recipec.compiler.modes.distill import teacher_config

        from .. import checkpoint as ckpt
        from ..ckpt_compat import model_record
        from ..model import build_model_chunks

        c, padded = teacher_config(self.config), self.context.plan.padded_vocab_size
        source = Path(self.options.teacher_load)
        key = "train.mode_options.teacher_load"
        if not source.exists():
            raise RecipeError(f"{key}: {source} does not exist; point it at the teacher's HF directory or recipec "
                              "checkpoint directory")
        chunks, _ = build_model_chunks(c, padded, on_gpu=self.context.on_gpu)
        if is_hf_dir(source):
            from ..hf.convert import cpu_mode, load_hf_into_chunks

            if not self.context.on_gpu:
                cpu_mode()
            load_hf_into_chunks(source, chunks, c, padded)
            where = f"Hugging Face weights {source}"
        else:
            step = ckpt.load_latest(source, chunks, None, None, "", with_optimizer=False, require=True,
                                    model=model_record(c, padded), source=key)
            where = f"{source} (step {step})"
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.teacher = chunks[0]
        m = c.model
        n = sum(p.numel() for p in self.teacher.parameters())
        log.info(f"distillation teacher: {m.num_layers} layers, hidden {m.hidden_size}, {n:,} parameters on this "
                 f"rank, frozen, from {where}; T = {self.options.temperature:g}, kd_weight = "
                 f"{self.options.kd_weight:g}")

    # ------------------------------------------------------------------ data (the data mode's)
    def build_data(self) -> None:
        self.data.build_data()
        self.train_data, self.valid_data = self.data.train_data, self.data.valid_data

    def events(self) -> list[dict[str, Any]]:
        return self.data.events()

    def microbatches(self, split: str, index: int) -> list[Batch]:
        return self.data.microbatches(split, index)

    # ------------------------------------------------------------------ step and loss
    def forward_step(self, data_iterator: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        from megatron.core import parallel_state

        batch = next(data_iterator)
        kwargs: dict[str, Any] = {}
        if "cu_seqlens" in batch:
            from .sft_packing import packed_seq_params

            kwargs["packed_seq_params"] = packed_seq_params(batch)
        args = (batch["tokens"], batch["position_ids"], None)
        with torch.no_grad():
            teacher_logits = self.teacher(*args, **kwargs)
        student_logits = model(*args, **kwargs)  # [b, s, V / TP]: no labels, so the logits come back
        group = None
        start = 0
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            group = parallel_state.get_tensor_model_parallel_group()
            start = parallel_state.get_tensor_model_parallel_rank() * student_logits.shape[-1]
        o = self.options
        return student_logits, partial(_loss, teacher_logits, batch["labels"], batch["loss_mask"], o.temperature,
                                       o.kd_weight, start, self.config.model.vocab_size, group)


def _loss(teacher: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float, kd_weight: float,
          vocab_start: int, vocab_size: int, group: Any,
          student: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return distill_loss(student, teacher, labels, mask, temperature, kd_weight, vocab_start, vocab_size, group)


MODE = Distill
