"""KL(teacher || student) with temperature, and the LM loss, on vocabulary-parallel logits.

Under tensor parallelism each rank holds the logits of its slice of the (padded) vocabulary,
[..., V / TP]. A softmax needs the max and the sum of exponentials over the whole vocabulary: an
all-reduce MAX (for stability) and an all-reduce SUM over the tensor-parallel group. A token's KL
and its cross entropy are sums over the vocabulary: each rank sums its slice, one more all-reduce
SUM completes them. With `group=None` nothing is reduced: the single-process computation the
tests compare against.

Gradients are written out, not left to autograd through the collectives: the per-token terms
reach every rank (the loss is replicated over TP), and a reduced value such as the softmax's
normaliser feeds every rank's slice, so an all-reduce whose backward is the identity would drop
the paths through the other ranks' slices (the tests catch that). The closed forms need only this
rank's slice: d KL_T / d z = (softmax(z / T) - softmax(t / T)) / T and d CE / d z = softmax(z) -
onehot(label), as Megatron-Core's vocab-parallel cross entropy does for the latter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def log_softmax(logits: torch.Tensor, group: Any = None) -> torch.Tensor:
    """log softmax over the last dimension, which is split across `group` (None: not split); no grad."""
    logits = logits.float()
    shifted = logits - _reduce(logits.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    return shifted - torch.log(_reduce(shifted.exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group))


class _DistillTerms(torch.autograd.Function):
    """(KL_T per token, cross entropy per token) of the student's vocab-parallel logits."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                vocab_start: int, vocab_size: int | None, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sum_ = dist.ReduceOp.SUM
        with torch.no_grad():
            student, teacher = student.float(), teacher.float()
            width = student.shape[-1]
            real = None
            if vocab_size is not None and vocab_start + width > vocab_size:  # this slice holds padding ids
                real = torch.arange(vocab_start, vocab_start + width, device=student.device) < vocab_size
                student = student.masked_fill(~real, float("-inf"))
                teacher = teacher.masked_fill(~real, float("-inf"))
            log_q = log_softmax(student, group)  # T = 1: the LM loss
            log_s = log_q if temperature == 1.0 else log_softmax(student / temperature, group)
            log_t = log_softmax(teacher / temperature, group)
            p_t = log_t.exp()
            terms = p_t * (log_t - log_s)
            if real is not None:
                terms = terms.masked_fill(~real, 0.0)  # 0 * (-inf - -inf) there
            kl = _reduce(terms.sum(dim=-1), sum_, group)
            local = labels - vocab_start
            here = (local >= 0) & (local < width)
            index = local.clamp(0, width - 1).unsqueeze(-1)
            ce = -_reduce(log_q.gather(-1, index).squeeze(-1) * here, sum_, group)
        ctx.temperature = temperature
        ctx.save_for_backward(log_q, log_s, p_t, index, here)
        return kl, ce

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor, grad_ce: torch.Tensor) -> tuple[Any, ...]:
        log_q, log_s, p_t, index, here = ctx.saved_tensors
        q = log_q.exp()
        p_s = q if log_s is log_q else log_s.exp()
        grad = grad_kl.unsqueeze(-1) * (p_s - p_t) / ctx.temperature
        onehot = torch.zeros_like(q).scatter_(-1, index, here.unsqueeze(-1).to(q.dtype))
        grad = grad + grad_ce.unsqueeze(-1) * (q - onehot)
        return grad, None, None, None, None, None, None


def distill_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  vocab_start: int = 0, vocab_size: int | None = None,
                  group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(softmax(teacher / T) || softmax(student / T)) and -log softmax(student)[label].

    This rank holds vocabulary ids [vocab_start, vocab_start + student.shape[-1]); ids from
    `vocab_size` on (Megatron's padding of the vocabulary) are left out of both softmaxes: they
    are no tokens, and a teacher read from an HF directory has no trained rows for them.
    Gradients flow to `student` only (the teacher is a constant)."""
    return _DistillTerms.apply(student, teacher, labels, temperature, vocab_start, vocab_size, group)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 temperature: float, kd_weight: float, vocab_start: int = 0, vocab_size: int | None = None,
                 group: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - w) * LM + w * T^2 * KL, each the mean over the tokens under `mask` (0/1).

    T^2 keeps the KL term's gradient on the scale of the LM term's as T changes (Hinton et al.).
    The reported "kl" is the plain mean KL at temperature T (0 when the teacher is the student)."""
    mask = mask.float()
    tokens = mask.sum().clamp(min=1.0)
    kl_tok, ce_tok = distill_terms(student, teacher, labels, temperature, vocab_start, vocab_size, group)
    kl, lm = (kl_tok * mask).sum() / tokens, (ce_tok * mask).sum() / tokens
    loss = (1.0 - kd_weight) * lm + kd_weight * temperature**2 * kl
    return loss, {"distill loss": loss.detach().clone(), "kl": kl.detach().clone(), "lm loss": lm.detach().clone()}
