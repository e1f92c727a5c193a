"""train.mode = "dpo": Direct Preference Optimization (Rafailov et al. 2023) with cDPO label smoothing.

Batch layout: `train.micro_batch_size` counts sequences, two per pair, so a microbatch of
micro_batch_size = 2k holds k pairs as rows [chosen_1 .. chosen_k, rejected_1 .. rejected_k]
(the compiler half refuses odd sizes). A sequence's log-prob is the sum over its answer tokens
(runtime/modes/dpo_data.py) of log p(token), read as minus the model's per-token loss with
labels = the next tokens: under tensor parallelism that is Megatron's vocab-parallel
cross-entropy, so no rank ever holds the full vocabulary.

The reference log-probs are computed on the fly in the forward step, under no_grad, by the
frozen reference model (runtime/modes/dpo_reference.py: a copy, or with LoRA the same chunks
with the adapters bypassed). With r = beta * (log pi - log pi_ref) per sequence,

    loss = mean over pairs of  -(1 - eps) log sigma(r_c - r_r) - eps log sigma(r_r - r_c)

and the metrics (averaged over microbatches and data-parallel ranks like the loss) are the
reward accuracy (r_c > r_r), the reward margin r_c - r_r, the mean rewards and the mean
chosen / rejected policy log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .base import Batch, LossFunc, TrainingMode

METRICS = ("dpo loss", "reward accuracy", "reward margin", "chosen reward", "rejected reward",
           "chosen logp", "rejected logp")


def sequence_logps(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p over the masked tokens (the per-token loss is -log p)."""
    return -(per_token_loss.float() * mask.float()).sum(dim=-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float,
             label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of rows [chosen..., rejected...] of sequence log-probs, and the metrics of `METRICS`."""
    k = policy.shape[0] // 2
    chosen = beta * (policy[:k] - reference[:k])
    rejected = beta * (policy[k:] - reference[k:])
    logits = chosen - rejected
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    loss = losses.mean()
    with torch.no_grad():
        values = (loss.detach().clone(), (chosen > rejected).float().mean(), (chosen - rejected).mean(),
                  chosen.mean(), rejected.mean(), policy[:k].detach().mean(), policy[k:].detach().mean())
    return loss, dict(zip(METRICS, values))


class DPO(TrainingMode):
    name = "dpo"
    metrics = METRICS

    def build_extra_models(self, trained: list[Any]) -> None:
        from recipec.compiler.modes.dpo import separate_reference

        self.reference: list[Any] | None = None
        if separate_reference(self.config):
            from .dpo_reference import build_reference

            self.reference = build_reference(self.context, trained, self.options.reference)
        else:
            import logging

            logging.getLogger("recipec.runtime").info(
                "dpo: reference model = the base weights (LoRA adapters bypassed in its forward; no second copy)")

    def build_data(self) -> None:
        from ..sft import SFTDataError
        from ..tokenizer import build_tokenizer
        from .dpo_data import PairDataset, load_pairs

        c, d = self.config, self.config.data
        s = c.model.seq_length
        pairs = load_pairs(list(d.paths), build_tokenizer(c), s, d.split, c.train.seed)
        self.train_data = PairDataset(pairs, pairs.order[:pairs.n_train], s, c.train.seed + 1)
        valid = pairs.order[pairs.n_train:pairs.n_train + pairs.n_valid]
        self.valid_data = PairDataset(pairs, valid, s, c.train.seed + 2) if len(valid) else None
        if self.valid_data is None and c.train.eval_interval:
            raise SFTDataError(f"dpo data: the valid split is empty (data.split={d.split!r} over {pairs.n_train} "
                               "pairs) but train.eval_interval is set; give the valid share more weight, or unset "
                               "train.eval_interval (~train.eval_interval)")

    def microbatches(self, split: str, index: int) -> list[Batch]:
        from megatron.core import parallel_state
        from recipec.compiler.plan import batch_layout

        dataset = self.train_data if split == "train" else self.valid_data
        # The compiler's one batch split counts sequences; this rank's are two per pair, in whole
        # microbatches (the compiler half keeps both batch sizes even), so halving gives its pairs.
        rows = batch_layout(self.config).rank_samples(index, parallel_state.get_data_parallel_rank())
        pairs_per_micro = self.config.train.micro_batch_size // 2
        device = self.context.device
        out = []
        for i in range(rows.start // 2, rows.stop // 2, pairs_per_micro):
            batch = dataset.microbatch(list(range(i, i + pairs_per_micro)))
            out.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        return out

    def reference_logps(self, model: Any, batch: Batch) -> torch.Tensor:
        """The reference model's sequence log-probs of this microbatch (no graph)."""
        args = (batch["tokens"], batch["position_ids"], None)
        with torch.no_grad():
            if self.reference is not None:
                per_token = self.reference[0](*args, labels=batch["labels"])
            else:
                from .dpo_reference import adapters_bypassed

                with adapters_bypassed(model):
                    per_token = model(*args, labels=batch["labels"])
            return sequence_logps(per_token, batch["loss_mask"])

    def forward_step(self, data_iterator: Iterator[Batch], model: Any) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data_iterator)
        reference = self.reference_logps(model, batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask, opts = batch["loss_mask"], self.options

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return dpo_loss(sequence_logps(per_token, mask), reference, opts.beta, opts.label_smoothing)

        return output, loss_func


MODE = DPO
