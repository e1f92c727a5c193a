"""bench/scaling.py on CPU: the real script, real `recipec launch` runs (torchrun, gloo processes)
of the tiny recipe at DP, TP, PP and CP on 1 and 2 processes, so the harness is known to work
before a multi-GPU machine is at hand. About 50 s on 2 cores (four launches of a few seconds'
start-up each; the CP launch is refused by the preflight within a second)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "scaling.py"
LAYOUTS = ("dp", "tp", "pp", "cp")
NUMBER = re.compile(r"\d+(\.\d+)?")


def _module():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(stdout: str) -> list[list[str]]:
    """The rows of the table printed last: the lines after its dashed rule, split on runs of spaces."""
    lines = stdout.rstrip().splitlines()
    rule = max(i for i, line in enumerate(lines) if line.startswith("------"))
    return [re.split(r"\s{2,}", line.strip(), maxsplit=12) for line in lines[rule + 1:]]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    pytest.importorskip("megatron.core")
    work = tmp_path_factory.mktemp("scaling")
    argv = [sys.executable, str(SCRIPT), "--cpu", "--gpus", "1,2", "--layouts", "dp,tp,pp,cp", "--steps", "4",
            "--warmup", "2", "--out", str(work / "out"), "--json", str(work / "scaling.json"), "model.num_layers=2"]
    proc = subprocess.run(argv, check=False, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout, json.loads((work / "scaling.json").read_text())


def test_a_row_per_layout_and_count_with_positive_numbers(cpu_run: tuple[str, dict]) -> None:
    stdout, report = cpu_run
    assert "strong scaling: global batch 8 sequences" in stdout  # 1 process: 8 microbatches of 1
    rows = _table(stdout)
    assert [(r[0], r[1]) for r in rows] == [(layout, n) for layout in LAYOUTS for n in ("1", "2")]
    for row in rows:
        if row[0] == "cp" and row[1] == "2":
            continue
        layout_cells, numbers = row[:6], row[6:]
        assert all(NUMBER.fullmatch(c) for c in layout_cells[1:]), row
        step_ms, tokens, per_gpu, tflops, mfu, efficiency = numbers
        assert mfu == "n/a", row  # no peak for "cpu"
        for cell in (step_ms, tokens, per_gpu, tflops, efficiency):
            assert NUMBER.fullmatch(cell) and float(cell) > 0, row
        if row[1] == "1":
            assert efficiency == "1.00", row
        else:
            assert float(per_gpu) == pytest.approx(float(tokens) / 2, rel=1e-3)
    by_key = {(r[0], r[1]): r for r in rows}
    assert by_key[("tp", "2")][2:6] == ["2", "1", "1", "1"] and by_key[("pp", "2")][2:6] == ["1", "2", "1", "1"]
    assert by_key[("dp", "2")][2:6] == ["1", "1", "1", "2"]
    # the JSON holds the same rows, with the runtime's own measurements
    assert report["scaling"] == "strong" and len(report["rows"]) == 8
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(ok) == 7 and all(r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 and r["steps_timed"] == 2
                                for r in ok)


def test_context_parallel_on_cpu_is_a_skipped_row_with_its_reason(cpu_run: tuple[str, dict]) -> None:
    stdout, report = cpu_run
    cp2 = next(r for r in _table(stdout) if r[:2] == ["cp", "2"])
    text = " ".join(cp2[6:])
    assert text.startswith("skipped: ") and "context parallelism needs Transformer Engine" in text
    row = next(r for r in report["rows"] if r["layout"] == "cp" and r["gpus"] == 2)
    assert row["status"] == "skipped" and row["exit_code"] == 2 and "[parallel.context_parallel_size]" in row["reason"]
    assert "\n" not in row["reason"]


def test_no_torch_at_import_and_one_line_reasons() -> None:
    """--help must be instant: the script imports the standard library only. A list of problems
    from recipec folds into one line; a crash gives its last error line."""
    probe = (f"import sys, runpy; sys.argv = ['scaling.py', '--help']\n"
             f"try: runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
             "except SystemExit: pass\n"
             "assert 'torch' not in sys.modules and 'recipec' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--layouts" in proc.stdout, proc.stderr
    scaling = _module()
    refused = ("recipec: error: 2 problems in this recipe:\n"
               "1. recipes_toml/llama3_tiny.toml:11: [model.num_attention_heads] num_attention_heads 4 is not "
               "divisible by tensor_model_parallel_size 8\n"
               "2. recipes_toml/llama3_tiny.toml:12: [model.num_query_groups] num_query_groups 2 is not divisible "
               "by tensor_model_parallel_size 8\n      hint: use tensor_model_parallel_size <= 2 that divides it\n")
    reason = scaling.one_line_reason(refused)
    assert reason.startswith("2 problems in this recipe; recipes_toml/llama3_tiny.toml:11: [model.num_attention_heads]")
    assert "[model.num_query_groups]" in reason and "\n" not in reason
    crash = "[default0]: Traceback (most recent call last):\n  File x\n[default0]: RuntimeError: boom\ntorchrun noise\n"
    assert scaling.one_line_reason(crash) == "RuntimeError: boom"
    # What a rank's failure looked like on the GPU (session 5): the first exception, not torchrun's report.
    gpu = ("   87.782 [default0]:[rank0]: ModuleNotFoundError: No module named 'nvidia_resiliency_ext'\n"
           "   87.782 [default0]:[rank0]:     raise ModuleNotFoundError(\n"
           "   95.046     raise ChildFailedError(\n   95.046 torch.distributed.elastic.multiprocessing.errors."
           "ChildFailedError: \n   95.046   traceback : To enable traceback see: https://pytorch.org/docs\n")
    assert scaling.one_line_reason(gpu) == "ModuleNotFoundError: No module named 'nvidia_resiliency_ext'"
    failed = {"layout": "pp", "gpus": 8, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 8,
              "context_parallel_size": 1, "status": "failed", "exit_code": 124, "reason": "stopped after 9 s"}
    assert scaling.table([failed]).splitlines()[-1].endswith("-  failed (exit 124): stopped after 9 s")
