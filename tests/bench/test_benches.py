"""The GPU benches' own checks, on CPU: gpu_bench's row plan (what users run: 8 microbatches per
step, a 1-microbatch host-overhead probe, the transformers loop with the same accumulation), the
log parsers the launch benches rely on, and the `--cpu --tiny` smoke modes of ckpt_bench and
start_bench end to end (real `recipec launch` runs of the tiny recipe). ~2 min on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from _common import resume_event, save_events, save_stalls, startup_breakdown


def _bench(script: str, *args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_gpu_bench_default_plan_is_what_users_run(tmp_path: Path) -> None:
    """Every default row compiles to 8 microbatches per step except the +mb1 probe (1), and the
    transformers loop of each shape accumulates the same 8."""
    from recipec.compiler import build

    proc = _bench("gpu_bench.py", "--plan", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["variant"]: r for r in json.loads(proc.stdout)}
    assert {"hf", "bf16", "bf16+mb1", "bf16+pao", "fp8_delayed", "fp8_blockwise", "hf@8b", "bf16@8b"} <= set(rows)
    for variant, row in rows.items():
        plan = build(row["recipe"], row["overrides"]).plan
        assert plan.microbatches_per_step == row["microbatches"], variant
        assert row["microbatches"] == (1 if "+mb1" in variant else 8), variant
    pao = build(rows["bf16+pao"]["recipe"], rows["bf16+pao"]["overrides"]).config.optimizer
    assert (pao.use_precision_aware_optimizer, pao.exp_avg_dtype, pao.exp_avg_sq_dtype) == (True, "bf16", "bf16")
    blockwise = build(rows["fp8_blockwise"]["recipe"], rows["fp8_blockwise"]["overrides"]).config.precision
    assert (blockwise.fp8, blockwise.fp8_format) == ("blockwise", "e4m3")


PAO = ["optimizer.use_precision_aware_optimizer=true", 'optimizer.exp_avg_dtype="bf16"',
       'optimizer.exp_avg_sq_dtype="bf16"']


@pytest.mark.parametrize(("extra", "key", "words"), [
    (['model.transformer_impl="local"', "launch.accelerator=H100-80GB"], "optimizer.use_precision_aware_optimizer",
     'model.transformer_impl is "local"'),
    ([], "optimizer.use_precision_aware_optimizer", "launch.accelerator is cpu"),
    (["launch.accelerator=H100-80GB", "optimizer.use_distributed_optimizer=false"],
     "optimizer.use_precision_aware_optimizer", "use_distributed_optimizer is false"),
    (["launch.accelerator=H100-80GB", 'optimizer.main_grads_dtype="bf16"'], "optimizer.main_grads_dtype",
     "grad_reduce_in_fp32 is true"),
])
def test_precision_aware_optimizer_refused_where_it_cannot_run(extra: list[str], key: str, words: str) -> None:
    """The compiler refuses what Megatron-Core would assert on at run time: exit 2, key and hint."""
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "build", "llama3_tiny", *PAO, *extra,
                           "-o", "/dev/null/x"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"[{key}]" in proc.stderr and words in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_precision_aware_dtype_needs_the_flag() -> None:
    from recipec.compiler import RecipeError, build

    with pytest.raises(RecipeError, match=r"optimizer.exp_avg_dtype.*precision-aware optimizer"):
        build("llama3_tiny", ['optimizer.exp_avg_dtype="bf16"'])
    opt = build("llama32_1b", PAO).config.optimizer  # a GPU recipe with TE modules: fine
    assert (opt.use_precision_aware_optimizer, opt.exp_avg_dtype, opt.main_params_dtype) == (True, "bf16", "fp32")


def test_runtime_refuses_precision_aware_optimizer_without_cuda() -> None:
    """A GPU recipe run where there is no CUDA (or no TE): a RecipeError naming the key, before
    Megatron's optimizer asserts (its message would be a traceback)."""
    pytest.importorskip("megatron.core")
    import torch
    from recipec.compiler import RecipeError, build
    from recipec.runtime.train import _optimizer

    if torch.cuda.is_available():
        pytest.skip("this checks the refusal on a machine without CUDA")
    config = build("llama3_tiny", [*PAO, "launch.accelerator=H100-80GB"]).config
    with pytest.raises(RecipeError, match=r"optimizer.use_precision_aware_optimizer.*CUDA GPU"):
        _optimizer(config, [])


def test_parsers_read_the_runtime_lines() -> None:
    text = (
        "[default0]:saving checkpoint step 10 in the background to /c/.tmp_iter_0000010: training paused 35 ms\n"
        "[default0]:saved checkpoint /c/iter_0000010 (1.50 GiB, written in the background at 900.0 MiB/s in 1.71 s, "
        "+0.40 s hashing); training paused 35 ms for it\n"
        "[default0]:saved checkpoint /c/iter_0000020 (13.0 MiB, written at 103.9 MiB/s) in 0.15 s (+0.02 s hashing "
        "in the background)\n"
        "[default0]:resumed from /c/iter_0000020 at step 20: verified 9 files (13.0 MiB) in 0.05 s, loaded in 0.31 s "
        "(41.9 MiB/s)\n"
        "[default0]:startup: imports 2.1 s, process group 0.3 s, model 3.4 s, optimizer 0.2 s, data 0.5 s, "
        "checkpoint load 0.0 s, first step 1.2 s; launch to first step 8.5 s"
    )
    saves = save_events(text)
    assert [(e["step"], e["stall_s"], e["done"]) for e in saves] == [(10, 0.035, False), (10, 0.035, True),
                                                                       (20, 0.15, True)]
    assert saves[1]["size_bytes"] == 1.5 * 2**30 and saves[1]["rates_Bps"] == [900 * 2**20]
    assert resume_event(text) == {"line": text.splitlines()[3], "step": 20, "verify_s": 0.05,
                                  "load_s": 0.31, "size_bytes": 13 * 2**20}
    parts = startup_breakdown([], text)
    assert parts == {"imports_s": 2.1, "process_group_s": 0.3, "model_s": 3.4, "optimizer_s": 0.2, "data_s": 0.5,
                     "checkpoint_load_s": 0.0, "first_step_s": 1.2, "launch_to_first_step_s": 8.5}
    assert startup_breakdown([{"event": "startup", "model_s": 1.0}], text) == {"model_s": 1.0}  # the event wins
    assert startup_breakdown([], "no such line") is None
    # a 1.0 s step with a 2.5 s pause in the step after the save at 10, 0.3 s more in the next
    times = {s: 1.0 for s in range(1, 31)} | {11: 3.5, 12: 1.3}
    median, stalls = save_stalls(times, [10, 20], interval=10)
    assert median == 1.0
    assert [(s["step"], round(s["first_s"], 6), round(s["total_s"], 6)) for s in stalls] == [(10, 2.5, 2.8),
                                                                                            (20, 0.0, 0.0)]


@pytest.mark.timeout(400)
def test_ckpt_bench_smoke(tmp_path: Path) -> None:
    """Sync and async saves of the tiny recipe: every save seen on disk with its size and write
    time, the stall of the save that has steps after it, the resume's load time, dd's rate."""
    pytest.importorskip("megatron.core")
    proc = _bench("ckpt_bench.py", "--cpu", "--tiny", "--saves", "2", "--save-interval", "3", "--dir", str(tmp_path),
                  "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "ckpt_bench.json").read_text())
    assert report["dd"]["Bps"] > 0
    assert [c["mode"] for c in report["cases"]] == ["sync", "async"]
    for case in report["cases"]:
        assert [s["step"] for s in case["saves"]] == [3, 6], case["mode"]
        assert all(s["bytes"] > 0 and s["save_to_complete_s"] > 0 for s in case["saves"]), case["saves"]
        assert case["saves"][0]["stall_total_s"] is not None and case["saves"][1]["stall_total_s"] is None
        assert case["resume"]["step"] == 6 and case["resume"]["load_s"] is not None
        assert case["summary"]["vs_dd"] > 0
        assert case["summary"]["final_save_to_complete_s"] > 0 and case["summary"]["reserve_cost_s"] is not None
    assert "| tiny | off |" in proc.stdout and "| tiny | on |" in proc.stdout
    # the async run planned the first save's staging memory ahead (runtime/pinned_staging.py), exactly
    train_log = (tmp_path / "out" / "ckpt_bench_tiny-async_train.log").read_text()
    assert re.search(r"staged into .*, covering (\d+) of \1 staged tensors, 0 unused", train_log), train_log[-3000:]


@pytest.mark.timeout(300)
def test_start_bench_smoke(tmp_path: Path) -> None:
    """A cold and a warm launch of the tiny recipe, timed to the first step's line."""
    pytest.importorskip("megatron.core")
    proc = _bench("start_bench.py", "--cpu", "--tiny", "--runs", "2", "--steps", "2", "--out", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "start_bench.json").read_text())
    assert [r["kind"] for r in report["runs"]] == ["cold", "warm"]
    for run in report["runs"]:
        assert 0 < run["launch_to_first_step_line_s"] < run["wall_s"]
        if run["startup"] is not None:  # the runtime's breakdown, when it writes one
            assert run["startup"]["first_step_s"] >= 0
    assert "| 1 (cold) |" in proc.stdout and "| 2 (warm) |" in proc.stdout
