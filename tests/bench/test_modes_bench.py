"""bench/modes_bench.py's `--cpu --tiny` smoke mode, end to end: the packed-vs-padded SFT part runs
two real `recipec launch` runs of the tiny SFT recipe on the same generated chat-like records and
reports non-pad tokens/s and the time to a fixed number of trained tokens (~40 s on 2 cores).
The generator's lengths vary like chat data and always fit one sequence.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from modes_bench import chat_records


def test_chat_records_vary_and_fit_one_sequence(tmp_path: Path) -> None:
    stats = chat_records(tmp_path / "chat.jsonl", 400, 4096)
    records = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    sizes = sorted(len(r["prompt"]) + len(r["response"]) for r in records)
    assert len(records) == 400 and sizes[-1] <= 4096 - 8
    assert sizes[len(sizes) // 2] * 2.5 < sizes[-1]  # a long tail, not one length
    assert 0.4 < stats["response_share"] < 0.9
    pairs = tmp_path / "pairs.jsonl"
    chat_records(pairs, 10, 128, preference=True)
    assert {"prompt", "chosen", "rejected"} == set(json.loads(pairs.read_text().splitlines()[0]))


def test_modes_bench_smoke_packed_vs_padded(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    proc = subprocess.run([sys.executable, str(BENCH / "modes_bench.py"), "--cpu", "--tiny", "--parts", "sft",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "out" / "modes_bench.json").read_text())
    sft = report["sft"]
    packed, padded = sft["rows"]
    assert (packed["name"], padded["name"]) == ("sft_packed", "sft_padded")
    assert sft["packing_efficiency"] > 0.8 > sft["padded_efficiency"] > 0.1
    for row in (packed, padded):
        assert row["rc"] == 0 and row["step_s"] > 0 and row["steps_timed"] >= 2
        assert row["time_to_target_s"] == pytest.approx(sft["target_tokens"] / row["nonpad_tokens_per_s"])
        assert row["time_to_target_loss_tokens_s"] > row["time_to_target_s"]
    # Non-pad tokens per step: a packed step carries several examples per sequence, a padded one one.
    assert packed["nonpad_tokens_per_step"] > 2 * padded["nonpad_tokens_per_step"]
    assert "| sft_packed |" in proc.stdout and "| sft_padded |" in proc.stdout and "sooner" in proc.stdout
