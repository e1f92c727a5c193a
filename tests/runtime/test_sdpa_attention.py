"""In-process checks of the device layer, the SDPA core attention and the spec picker.

SDPAttention is compared with an independent, written-out causal GQA attention; the
end-to-end training tests (test_mcore_cpu.py) cover it inside real GPT layers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from runtime import device  # noqa: E402
from runtime.attention import SDPAttention  # noqa: E402
from runtime.layer_spec import LOCAL_LABEL, gpt_layer_spec  # noqa: E402


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention, [s, b, h, d] in, [s, b, h*d] out; kv head = q head // ratio."""
    s, b, nq, d = q.shape
    ratio = nq // k.shape[2]
    out = torch.empty(s, b, nq, d, dtype=q.dtype)
    causal = torch.ones(s, s).tril().bool()
    for h in range(nq):
        qh, kh, vh = q[:, :, h], k[:, :, h // ratio], v[:, :, h // ratio]  # [s, b, d]
        scores = torch.einsum("ibd,jbd->bij", qh, kh) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, :, h] = torch.einsum("bij,jbd->ibd", scores.softmax(-1), vh)
    return out.reshape(s, b, nq * d)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1), (2, 1)])
def test_sdpa_matches_reference_gqa(heads: int, groups: int) -> None:
    cfg = TransformerConfig(num_layers=1, hidden_size=16 * heads, num_attention_heads=heads,
                            num_query_groups=groups, attention_dropout=0.0)
    attn = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                        attention_type="self", pg_collection=None, future_kwarg=1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 3, heads, 16, generator=gen)
    k = torch.randn(7, 3, groups, 16, generator=gen)
    v = torch.randn(7, 3, groups, 16, generator=gen)
    got = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    assert got.shape == (7, 3, heads * 16)
    torch.testing.assert_close(got, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_flow() -> None:
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                            num_query_groups=1, attention_dropout=0.0)
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q = torch.randn(5, 2, 2, 16, requires_grad=True)
    k = torch.randn(5, 2, 1, 16, requires_grad=True)
    v = torch.randn(5, 2, 1, 16, requires_grad=True)
    attn(q, k, v, None).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_layer_spec_falls_back_to_local_sdpa_without_te() -> None:
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine installed: TE spec is chosen")
    except Exception:  # noqa: BLE001
        pass
    from megatron.core.transformer.identity_op import IdentityOp

    spec, label = gpt_layer_spec(None, False, True, "RMSNorm")
    assert label == LOCAL_LABEL
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention is SDPAttention
    # qk_layernorm must reach Megatron's builder (0.17+ wraps it in *args/**kwargs).
    assert attn.q_layernorm is not IdentityOp and attn.k_layernorm is not IdentityOp
    plain, _ = gpt_layer_spec(None, False, False, "LayerNorm")
    assert plain.submodules.self_attention.submodules.q_layernorm is IdentityOp
    assert plain.submodules.self_attention.submodules.core_attention is SDPAttention


def test_activate_cpu_mode_is_idempotent() -> None:
    if torch.cuda.is_available():
        assert device.activate_cpu_mode() is False
        return
    assert device.activate_cpu_mode() is True
    n = len(device.PATCHED)
    assert device.activate_cpu_mode() is True
    assert len(device.PATCHED) == n
    assert device.device_for_runtime() == torch.device("cpu")
    from megatron.core.transformer import utils as tutils

    # get_default_causal_mask hard-codes device="cuda"; in CPU mode it allocates on CPU.
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]
    # Scoped type patch is undone after the wrapped call.
    assert torch.zeros(1).type() == "torch.FloatTensor"
