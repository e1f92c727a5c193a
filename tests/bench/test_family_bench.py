"""bench/family_bench.py's CPU smoke mode: a family's tiny recipe through `recipec launch`, one table row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_family_bench_smoke(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "family_bench.py"), "--cpu", "--tiny", "--rows",
                          "gpt_oss_tiny", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    table = run.stdout.strip().splitlines()
    assert table[0].split()[:2] == ["row", "prec"] and table[1].startswith("gpt_oss_tiny")
    (row,) = json.loads((tmp_path / "family_bench.json").read_text())
    assert row["rc"] == 0 and row["tokens_per_s"] > 0 and row["params_b"] > 0 and row["mfu"] is None


def test_unknown_row_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "family_bench.py"), "--rows", "nope", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "unknown row 'nope'" in run.stderr
