"""The compile-time memory estimate against peaks measured on the GPU.

Every runtime row of every committed bench result (bench/results/*.json: recipe overrides and
`torch.cuda.max_memory_allocated`, one process, H100) is compiled again here; the plan's
estimate must stay within 15% of the measurement and must not under-count it (by more than the
2% allocator noise seen between identical runs), so a recipe the compiler accepts fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipec.compiler import build

RESULTS = sorted((Path(__file__).parents[2] / "bench" / "results").glob("gpu_bench_*.json"))


def _measured_rows() -> list[tuple[str, str, list[str], float]]:
    rows = []
    for path in RESULTS:
        for variant, row in json.loads(path.read_text())["results"].items():
            if "layer_spec" not in row or "overrides" not in row or "peak_mem_gib" not in row:
                continue  # transformers-loop rows and results from before overrides were recorded
            if row["layer_spec"] != "transformer_engine" or row.get("cuda_graph") == "layers":
                # The estimate models TE's fused layers run eagerly or as one full-iteration graph.
                # Measured outside that (bench/RESULTS.md): local modules +10% (compiled) to +29%
                # over it, which the compiler warns about; per-layer graphs 15-32% under it (safe).
                continue
            recipe = row.get("recipe") or ("llama3_8b" if "@8b" in variant else "llama32_1b")
            rows.append((f"{path.stem}:{variant}", recipe, row["overrides"], row["peak_mem_gib"]))
    return rows


ROWS = _measured_rows()


def test_there_are_measurements_to_check() -> None:
    assert len(ROWS) >= 8 and any("fp8" in r[0] for r in ROWS) and any("@8b" in r[0] for r in ROWS)


@pytest.mark.parametrize(("recipe", "overrides", "measured"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_estimate_is_within_15_percent_and_safe(recipe: str, overrides: list[str], measured: float) -> None:
    estimate = build(recipe, overrides).plan.memory_gib
    error = (measured - estimate["total"]) / estimate["total"]
    assert -0.15 <= error <= 0.02, f"measured {measured:.2f} GiB vs estimate {estimate} ({error:+.1%})"


def test_fp8_term_covers_what_fp8_added_over_bf16() -> None:
    """Same file, same shape: the peak FP8 adds over bf16 is what the plan's fp8 term must cover."""
    by_name = {r[0]: r for r in ROWS}
    pairs = [(name, name.replace("fp8_tensorwise", "bf16")) for name in by_name
             if "fp8_tensorwise" in name and "+" not in name.split(":")[1]]
    pairs = [(f, b) for f, b in pairs if b in by_name]
    assert len(pairs) >= 2
    for fp8_name, bf16_name in pairs:
        _, recipe, overrides, measured = by_name[fp8_name]
        added = measured - by_name[bf16_name][3]
        term = build(recipe, overrides).plan.memory_gib["fp8"]
        assert added <= term <= added + 1.0, f"{fp8_name}: FP8 added {added:.2f} GiB, plan's fp8 term {term} GiB"
