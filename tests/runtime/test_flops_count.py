"""The compiler's FLOPs per step (Megatron's formula) against torch's FLOP counter on the real
Megatron-Core model: the MFU the runtime reports is only as good as this number."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from recipec.compiler import build  # noqa: E402


@pytest.mark.parametrize("overrides", [
    [],  # tiny Llama: GQA, SwiGLU, untied
    ["model.num_query_groups=4", "model.gated_linear_unit=false", "model.activation=gelu",
     "model.share_embeddings_and_output_weights=true"],
])
def test_formula_matches_counted_flops(mcore_tp1: None, overrides: list[str]) -> None:
    from recipec.runtime.device import activate_cpu_mode
    from recipec.runtime.model import build_model_chunks

    activate_cpu_mode()
    compiled = build("llama3_tiny", ["train.global_batch_size=2", "train.micro_batch_size=2", *overrides])
    c, plan = compiled.config, compiled.plan
    (model,) = build_model_chunks(c, plan.padded_vocab_size, on_gpu=False)[0]
    b, s = c.train.micro_batch_size, c.model.seq_length
    tokens = torch.randint(0, c.model.vocab_size, (b, s))
    positions = torch.arange(s).expand(b, s)
    counter = FlopCounterMode(display=False)
    # The math SDPA backend runs attention as matmuls the counter sees (the fused CPU kernel
    # is not registered with it); it computes the full s x s scores, as the formula counts them.
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
    counted = counter.get_total_flops()
    formula = plan.flops_per_step  # one step = this one microbatch
    # Megatron's formula is exactly the model's matmul FLOPs, forward and backward (norms,
    # softmax and rotary are elementwise and not counted by either).
    assert formula == counted, (formula, counted, formula / counted)
