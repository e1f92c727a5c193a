"""The sft mode's packing pieces in-process: the packing plan (best fit, deterministic, cached by
content), the packed row layout, and SDPA's composed mask on Megatron's THD layout against
attention computed one example at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import itertools

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from recipec.runtime.attention import SDPAttention
from recipec.runtime.modes.sft_packing import (
    PackedSFTDataset,
    best_fit,
    cached_plan,
    collate_packed,
)
from recipec.runtime.sft import load_examples
from recipec.runtime.tokenizer import ByteTokenizer


def test_best_fit_fills_rows_within_capacity_and_keeps_every_example_once() -> None:
    lengths = numpy.random.RandomState(0).randint(1, 60, size=500)
    offsets, items = best_fit(lengths, 128)
    assert sorted(items.tolist()) == list(range(500))
    fills = [int(lengths[items[a:b]].sum()) for a, b in itertools.pairwise(offsets)]
    assert max(fills) <= 128 and sum(fills) == int(lengths.sum())
    assert sum(fills) / (128 * len(fills)) > 0.95  # best fit leaves little padding on these lengths
    again = best_fit(lengths, 128)
    assert numpy.array_equal(again[0], offsets) and numpy.array_equal(again[1], items)


def test_packing_plan_is_cached_by_content(tmp_path: Path) -> None:
    lengths = numpy.arange(1, 40)
    cached_plan(lengths, 64, tmp_path)
    cached_plan(lengths.copy(), 64, tmp_path)
    assert len(list(tmp_path.glob("pack_*.npz"))) == 1  # same lengths, same entry
    cached_plan(lengths[::-1].copy(), 64, tmp_path)
    cached_plan(lengths, 96, tmp_path)
    assert len(list(tmp_path.glob("pack_*.npz"))) == 3


def test_a_packed_row_restarts_positions_and_masks_prompts_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                            for p, r in [("ab", "c"), ("de", "fg"), ("h", "ij")]))
    tok = ByteTokenizer()
    ex = load_examples([str(path)], tok, 32, "1,0,0", 1, tmp_path / "cache", "test")
    data = PackedSFTDataset(ex, ex.train, 32, 2, 1, tmp_path / "cache")
    assert data.rows == 1 and data.efficiency == pytest.approx((3 + 4 + 3) / 32)
    batch = collate_packed([data[0]])
    cu = batch["cu_seqlens"].tolist()
    assert batch["tokens"].shape == (1, 32) and cu[-1] == 32 and len(cu) == 5  # 3 examples + padding
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"] == 22
    for a, b in itertools.pairwise(cu):
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
    trained = set()
    for a, b in list(itertools.pairwise(cu))[:3]:  # each example trains on its response and its end-of-text only
        labels = batch["labels"][0, a:b][batch["loss_mask"][0, a:b] > 0].tolist()
        assert labels[-1] == tok.eod
        trained.add(tok.detokenize(labels[:-1]))
    assert trained == {"c", "fg", "ij"}
    assert batch["loss_mask"][0, cu[3]:].sum() == 0  # the padding carries no loss


def reference_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Causal attention of each segment alone ([t, h, d] in, [t, h*d] out), written out."""
    out = []
    ratio = q.shape[1] // k.shape[1]
    for a, b in itertools.pairwise(cu):
        qs, ks, vs = q[a:b], k[a:b].repeat_interleave(ratio, 1), v[a:b].repeat_interleave(ratio, 1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / qs.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs).reshape(b - a, -1))
    return torch.cat(out)


def test_sdpa_on_thd_attends_within_each_example_only() -> None:
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0)
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    cu = [0, 5, 6, 13, 16]
    q, k, v = (torch.randn(16, n, 16, generator=gen) for n in (4, 2, 2))
    tensor = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=tensor, cu_seqlens_kv=tensor, max_seqlen_q=7,
                             max_seqlen_kv=7)
    got = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
    torch.testing.assert_close(got.reshape(16, -1), reference_segments(q, k, v, cu), atol=1e-5, rtol=1e-5)
