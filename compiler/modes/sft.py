"""train.mode = "sft": supervised finetuning on jsonl records, loss on the response tokens only.

With `data.packing = true` several examples share one sequence (runtime/sft_pack.py): each
attends only to itself (THD with cu_seqlens under Transformer Engine, a block-diagonal causal
mask on the local path), position ids restart per example. The rules below refuse what that
layout cannot run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._sft_data import needs_jsonl

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import ExtraModel, Finding


class SFT:
    name = "sft"
    options = None

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        d, t, p = config.data, config.train, config.parallel
        yield from needs_jsonl(config, self.name, "jsonl prompt/response or messages records")
        if not d.packing:
            return
        if t.micro_batch_size != 1:
            yield ("train.micro_batch_size", (f"packed sequences (data.packing) go one per microbatch, in "
                   f"Megatron's THD layout; micro_batch_size is {t.micro_batch_size}"),
                   "set train.micro_batch_size=1 (a packed sequence already holds many examples)")
        if p.context_parallel_size > 1:
            yield ("parallel.context_parallel_size", (f"packed sequences with context parallelism "
                   f"({p.context_parallel_size}) are not supported by recipec yet (each example would have to "
                   f"be padded to a multiple of 2 x CP and split per example)"),
                   "set data.packing=false, or parallel.context_parallel_size=1")
        if t.cuda_graph != "none":
            yield ("train.cuda_graph", ("packed sequences change their boundaries (cu_seqlens) every step, "
                   "which a captured CUDA graph cannot follow"), 'set train.cuda_graph="none" or data.packing=false')

    def extra_models(self, config: RecipeConfig) -> Iterable[ExtraModel]:
        return ()


MODE = SFT()
