"""Fast start: seconds from `recipec launch` to the first completed step, and where they go.

    python bench/start_bench.py [--recipe llama32_1b] [--runs 2] [--out DIR]     # one GPU
    python bench/start_bench.py --cpu --tiny                                     # smoke, CPU

Each run is `recipec launch RECIPE` as a user types it (compile, torchrun, one rank), timed from
the start of that subprocess to the arrival of the first step's progress line; the rank's own
breakdown (imports, process group, model build and init, optimizer, data, checkpoint load, first
step) comes from its `startup` event in metrics.jsonl or its `startup: ...` log line, when the
runtime writes them (a run without them reports the wall clock only). Runs after the first reuse
the output directory, so they show a warm start: dataset indexes cached under
<output_dir>/data/index_cache and files in the page cache.

The 1B recipe runs as shipped on one GPU except: launch.gpus_per_node=1, train.global_batch_size=
8 x micro batch (8 microbatches per step, what users run), train.train_iters=--steps,
logging.log_interval=1 (the first step's line), no checkpoints, no eval. Target (issue 15):
< 30 s to the first step. Prints a table last and writes start_bench.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, launch, read_jsonl, startup_breakdown

TARGET_S = 30.0
TINY = ["launch.accelerator=cpu", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64", "train.micro_batch_size=2"]
PARTS = (("imports_s", "imports"), ("process_group_s", "process group"), ("model_s", "model"),
         ("optimizer_s", "optimizer"), ("data_s", "data"), ("checkpoint_load_s", "ckpt load"),
         ("first_step_s", "first step"))


def overrides(args: argparse.Namespace, out_dir: Path) -> list[str]:
    mbs = 2 if args.tiny else args.micro_batch
    ov = ["launch.nodes=1", "launch.gpus_per_node=1", f"train.train_iters={args.steps}", "logging.log_interval=1",
          "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last", "~checkpoint.load",
          "~train.eval_interval", f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs * args.microbatches}",
          "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
          "parallel.context_parallel_size=1", f'launch.output_dir="{out_dir}"']
    if args.tiny:
        ov += [o for o in TINY if not o.startswith("train.micro_batch_size")]
    elif args.cpu:
        ov.append("launch.accelerator=cpu")
    return ov + list(args.override)


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.out).resolve()
    work = root / "start_bench_work"
    if work.exists():
        shutil.rmtree(work)
    out_dir = work / "run"
    results: list[dict[str, Any]] = []
    for i in range(args.runs):
        metrics = out_dir / "metrics.jsonl"
        offset = metrics.stat().st_size if metrics.exists() else 0
        print(f"\n=== start_bench run {i + 1}/{args.runs}: recipec launch {args.recipe} ({'cold' if i == 0 else 'warm'})",
              flush=True)
        res = launch(args.recipe, overrides(args, out_dir), cwd=work, cpu=args.cpu, timeout_s=args.timeout_s,
                     log_path=root / f"start_bench_run{i + 1}.log",
                     on_line=lambda t, line: print(f"{t:8.2f} {line}", flush=True) if args.echo else None)
        rows = read_jsonl(metrics, offset)
        row: dict[str, Any] = {"run": i + 1, "kind": "cold" if i == 0 else "warm", "rc": res.rc,
                               "wall_s": res.wall_s, "launch_to_first_step_line_s": res.first_step_s(),
                               "startup": startup_breakdown(rows, res.text)}
        if res.rc != 0:
            row["error"] = f"recipec launch exited {res.rc}"
            row["tail"] = res.tail()
            print(res.tail(), flush=True)
        results.append(row)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"recipe": args.recipe, "overrides": overrides(args, out_dir), "target_s": TARGET_S, "runs": results}


def table(report: dict[str, Any]) -> str:
    head = ("| run | launch → first step line (s) | runtime: launch → first step (s) | "
            + " | ".join(f"{label} (s)" for _, label in PARTS) + " | process wall (s) | < 30 s |")
    lines = [head, "|" + " --- |" * (5 + len(PARTS))]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} ({r['kind']}) | failed: {r['error']} |" + " |" * (3 + len(PARTS)))
            continue
        s = r["startup"] or {}
        first = s.get("launch_to_first_step_s") or r["launch_to_first_step_line_s"]
        ok = "—" if first is None else ("yes" if first < TARGET_S else "**no**")
        lines.append(f"| {r['run']} ({r['kind']}) | {fmt(r['launch_to_first_step_line_s'], '.1f')} | "
                     f"{fmt(s.get('launch_to_first_step_s'), '.1f')} | "
                     + " | ".join(fmt(s.get(k), ".2f") for k, _ in PARTS)
                     + f" | {r['wall_s']:.1f} | {ok} |")
    if all(r.get("startup") is None for r in report["runs"]):
        lines.append("\n(no `startup` event or log line from the runtime: wall clock only)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="llama32_1b")
    p.add_argument("--runs", type=int, default=2, help="launches; the first is cold, the rest reuse its directory")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=1, help="micro batch of the recipe's own seq length")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--override", action="append", default=[], help="one more recipe override (repeatable)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/start_bench")
    p.add_argument("--timeout-s", type=float, default=420.0, help="per launch")
    p.add_argument("--cpu", action="store_true", help="launch.accelerator=cpu, no GPU")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the recipe (with --cpu: the smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--echo", action="store_true", help="print the runs' output as it comes")
    args = p.parse_args(argv)
    if args.tiny and args.recipe == "llama32_1b":
        args.recipe = "llama3_tiny"
    started = time.perf_counter()
    report = run(args)
    report["bench_s"] = time.perf_counter() - started
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "start_bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nstart_bench: {args.recipe} on one {'CPU process' if args.cpu else 'GPU'}; {report['bench_s']:.0f} s; "
          f"wrote {out / 'start_bench.json'}\n")
    print(table(report), flush=True)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
