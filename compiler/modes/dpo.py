"""train.mode = "dpo": Direct Preference Optimization on jsonl preference pairs (torch-free half).

Data: `data.kind = "sft"` (the jsonl reader) with records `{"prompt", "chosen", "rejected"}`
(strings) or their messages form (runtime/modes/dpo_data.py). Each pair's chosen and rejected
sequence sit in the same microbatch: `train.micro_batch_size` and `train.global_batch_size`
count *sequences*, two per pair, so both must be even; a microbatch holds micro_batch_size / 2
pairs, and Megatron's schedule, the token counts and the FLOPs see the sequences they run.

The loss (Rafailov et al. 2023, with cDPO label smoothing) needs a frozen reference model:

- LoRA without `reference`: the trained chunks themselves with the adapters bypassed (the base
  weights are frozen, so this is exactly the starting model); no extra weights in memory.
- full finetuning (or any run with `reference` set): a second, forward-only copy of the model,
  laid out like the trained one, loaded from `reference` if set, else from the recipe's start
  weights (`checkpoint.pretrained`, or the seeded init when there is none). It enters the memory
  estimate as weights only and the FLOPs as one forward pass per sequence (compiler/modes/base).

Options (`[train.mode_options]`): beta, label_smoothing, reference (see `DPOOptions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

from ..schema._fields import option
from ._sft_data import needs_jsonl
from .base import ExtraModel

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import Finding


@attrs.frozen
class DPOOptions:
    """The keys of `[train.mode_options]` under train.mode = "dpo"."""

    beta: float = option(0.1, "DPO's beta: the strength of the KL pull towards the reference model "
                         "(the implicit reward is beta x the policy/reference log-ratio). Must be > 0.", min=0.0)
    label_smoothing: float = option(0.0, "cDPO: the assumed probability that a preference label is flipped "
                                    "(0 = plain DPO); below 0.5.", min=0.0, max=0.49)
    reference: str = option("", "The frozen reference model: empty = this run's start weights (with LoRA: the "
                            "base model, adapters bypassed); else a recipec checkpoint directory or a Hugging "
                            "Face directory of the same architecture.")


# Field types are strings under postponed annotations; the validators need the real types, also in
# the runtime, where compiler/modes.options() builds this class without resolving them first.
attrs.resolve_types(DPOOptions)


class DPO:
    name = "dpo"
    options = DPOOptions

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        d, t, p = config.data, config.train, config.parallel
        yield from needs_jsonl(config, self.name, 'jsonl preference records ({"prompt", "chosen", "rejected"}) '
                               "through the jsonl reader")
        if d.packing:
            yield ("data.packing", ("train.mode \"dpo\" puts one sequence per row (a pair's chosen and rejected "
                   "side by side); packing is not supported for preference pairs"), "unset it with ~data.packing")
        if config.tokenizer.type == "null":
            yield ("tokenizer.type", 'train.mode "dpo" tokenizes text records; tokenizer.type is "null"',
                   'set tokenizer.type="byte" or "huggingface"')
        for key, value in (("train.micro_batch_size", t.micro_batch_size),
                           ("train.global_batch_size", t.global_batch_size)):
            if value % 2:
                yield (key, (f"train.mode \"dpo\" counts sequences, two per preference pair (chosen and "
                       f"rejected in the same microbatch), so {key} must be even; it is {value}"),
                       f"set {key}={value + 1} (or {max(2, value - 1)})")
        if p.pipeline_model_parallel_size > 1:
            yield ("parallel.pipeline_model_parallel_size", (f"train.mode \"dpo\" runs its reference forward "
                   f"inside the forward step, which a pipeline of {p.pipeline_model_parallel_size} stages "
                   f"cannot do yet"), "set parallel.pipeline_model_parallel_size=1 (use tensor or data parallelism)")
        if p.context_parallel_size > 1:
            yield ("parallel.context_parallel_size", (f"train.mode \"dpo\" sums log-probs over whole sequences; "
                   f"context parallelism ({p.context_parallel_size}) splits them and is not supported yet"),
                   "set parallel.context_parallel_size=1")
        options = config.train.mode_options
        beta = options.get("beta", 0.1)
        if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta == 0:  # < 0: the option's bound
            yield ("train.mode_options.beta", f"train.mode_options.beta must be > 0, got {beta!r}",
                   "DPO papers use 0.1 (0.01 .. 0.5)")
        reference = options.get("reference", "")
        if isinstance(reference, str) and any(ch in reference for ch in "\n\r\0"):
            yield ("train.mode_options.reference", "train.mode_options.reference holds a newline or NUL",
                   "give the directory's path on one line")

    def extra_models(self, config: RecipeConfig) -> Iterable[ExtraModel]:
        if separate_reference(config):
            # Frozen, forward-only: one forward per trained sequence (the chosen and the rejected
            # sequences are both in the global batch already).
            yield ExtraModel("reference", config.model, forwards_per_sequence=1.0)


def separate_reference(config: RecipeConfig) -> bool:
    """Whether the reference is a model of its own (else: the LoRA run's chunks, adapters bypassed)."""
    return config.peft.method != "lora" or bool(config.train.mode_options.get("reference", ""))


MODE = DPO()
