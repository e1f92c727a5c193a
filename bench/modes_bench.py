"""Training modes on one GPU: packed vs padded SFT, a DPO step and a distillation step vs SFT.

    python bench/modes_bench.py [--out DIR]                  # one GPU, the Llama 3.2 1B recipes
    python bench/modes_bench.py --cpu --tiny --parts sft     # smoke, CPU (tests/bench/test_modes_bench.py)

Every row is `recipec launch` as a user types it (bench/_common.launch), one rank, TP 1, bf16 as
the recipe ships, logging.log_interval=1; a row's step time is the median of its per-step times
(metrics.jsonl) after the first `--warmup` steps. The data is generated here (a fixed seed):
chat-like jsonl prompt/response records whose lengths vary like real chat data (log-normal
prompt and response lengths, a long tail, all within one sequence), read with the byte tokenizer
(no tokenizer download on the GPU machine; one token per byte), so the 128K-vocab output layer
and the model are the 1B's own.

(a) sft: the same records, padded (one example per 4096-token sequence) and packed (several per
    sequence, data.packing), global batch 8 x micro batch 1 each. Trained tokens per step count
    only the non-pad tokens: packed = global batch x seq x the packing efficiency the runtime
    reports (its `packing` event); padded = global batch x the mean example length (the same
    event: non-pad tokens / examples). Loss tokens are the response share of those (measured on
    the generated records, the same in both layouts). Reports non-pad tokens/s and the time to
    --target-tokens trained (non-pad) and loss tokens.
(b) dpo: `train.mode=dpo` on preference records ({"prompt", "chosen", "rejected"}) vs a plain padded
    SFT step, both 16 sequences of micro batch 2 (DPO: 8 pairs, its frozen reference included).
    Printed as skipped when this checkout has no DPO mode.
(c) distill: `train.mode=distill` with the 1B as its own teacher (loaded from the checkpoint the
    SFT step row saves) vs that SFT step: the cost of the teacher's forward and the KL.

Prints a table last and writes modes_bench.json under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    failure_reason,
    fmt,
    launch,
    per_step_times,
    read_jsonl,
    recipec_pythonpath,
)

PARTS = ("sft", "dpo", "distill")
TINY = ["launch.accelerator=cpu", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2"]


# ---------------------------------------------------------------- synthetic chat-like data
def _length(rng: random.Random, median: float, cap: int) -> int:
    """Log-normal lengths (sigma 0.9): most turns short, a long tail, as in chat logs."""
    return max(4, min(cap, int(rng.lognormvariate(math.log(median), 0.9))))


def _text(rng: random.Random, n: int) -> str:
    words = ("the", "model", "answer", "question", "please", "explain", "data", "step", "why", "because", "code",
             "function", "return", "value", "list", "first", "then", "result", "error", "fix", "user", "time")
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def chat_records(path: Path, n: int, seq: int, seed: int = 0, preference: bool = False) -> dict[str, float]:
    """n records that fit one `seq`-token sequence (byte tokenizer: bytes + a few specials);
    returns their byte statistics (the response share is the loss-token share)."""
    rng = random.Random(seed)
    budget = seq - 8
    prompt_median, response_median = max(8, seq * 0.08), max(8, seq * 0.15)
    prompt_bytes = response_bytes = 0
    with open(path, "w") as f:
        for _ in range(n):
            p = _length(rng, prompt_median, budget // 2)
            r = _length(rng, response_median, budget - p - 1)
            record: dict[str, str] = {"prompt": _text(rng, p) + "\n"}
            if preference:
                record["chosen"] = _text(rng, r)
                record["rejected"] = _text(rng, _length(rng, response_median, budget - p - 1))
            else:
                record["response"] = _text(rng, r)
            f.write(json.dumps(record) + "\n")
            prompt_bytes += p + 1
            response_bytes += r
    return {"records": n, "mean_bytes": (prompt_bytes + response_bytes) / n,
            "response_share": response_bytes / (prompt_bytes + response_bytes)}


# ---------------------------------------------------------------- one launch
def base_overrides(args: argparse.Namespace, out_dir: Path, data: Path) -> list[str]:
    ov = ["launch.nodes=1", "launch.gpus_per_node=1", "parallel.tensor_model_parallel_size=1",
          "parallel.pipeline_model_parallel_size=1", "parallel.context_parallel_size=1",
          f"train.train_iters={args.steps}", "~scheduler.lr_warmup_iters", "scheduler.lr_warmup_fraction=0.1",
          f"scheduler.lr_decay_iters={args.steps}", "logging.log_interval=1", "~train.eval_interval",
          "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last", "~checkpoint.load",
          "~checkpoint.pretrained", "tokenizer.type=byte", "~tokenizer.path", 'data.split="1,0,0"',
          "data.num_workers=0", f"data.paths=[{json.dumps(str(data))}]", f"launch.output_dir={json.dumps(str(out_dir))}"]
    if args.tiny:
        ov += TINY
    elif args.cpu:
        ov.append("launch.accelerator=cpu")
    return ov


def run_row(args: argparse.Namespace, name: str, recipe: str, overrides: list[str]) -> dict[str, Any]:
    root = Path(args.out).resolve() / "modes_bench_work"
    out_dir = root / name
    ov = [o.replace("@OUT@", str(out_dir)) for o in overrides]
    print(f"\n=== modes_bench {name}: recipec launch {recipe} {' '.join(ov)}", flush=True)
    res = launch(recipe, ov, cwd=root, cpu=args.cpu, timeout_s=args.timeout_s,
                 log_path=Path(args.out).resolve() / f"modes_bench_{name}.log",
                 on_line=lambda t, line: print(f"{t:8.2f} {line}", flush=True) if args.echo else None)
    rows = read_jsonl(out_dir / "metrics.jsonl")
    times = per_step_times(rows)
    steady = [t for s, t in sorted(times.items()) if s > args.warmup]
    row: dict[str, Any] = {"name": name, "recipe": recipe, "overrides": ov, "rc": res.rc, "wall_s": res.wall_s,
                           "step_s": statistics.median(steady) if steady else None, "steps_timed": len(steady),
                           "runtime_tokens_per_s": _median([r.get("tokens_per_s") for r in rows
                                                            if r.get("window_steps") == 1 and r["step"] > args.warmup]),
                           "mem_gib": max([float(r.get("mem_gib") or 0) for r in rows] or [0.0]),
                           "events": [r for r in rows if "event" in r and r["event"] != "startup"]}
    if res.rc != 0 or row["step_s"] is None:
        row["error"] = f"recipec launch exited {res.rc}: {failure_reason(res.text)}" if res.rc else "no timed steps"
        row["tail"] = res.tail()
        print(res.tail(), flush=True)
    return row


def _median(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


# ---------------------------------------------------------------- the parts
def part_sft(args: argparse.Namespace, work: Path, seq: int) -> dict[str, Any]:
    data = work / "chat.jsonl"
    stats = chat_records(data, args.records, seq)
    gbs = args.global_batch
    common = [*base_overrides(args, Path("@OUT@"), data), "train.mode=sft", "train.micro_batch_size=1",
              f"train.global_batch_size={gbs}"]
    packed = run_row(args, "sft_packed", args.sft_recipe, [*common, "data.packing=true"])
    padded = run_row(args, "sft_padded", args.sft_recipe, [*common, "data.packing=false"])
    event = next((e for e in packed["events"] if e.get("event") == "packing" and e.get("split") == "train"), None)
    result: dict[str, Any] = {"data": stats, "seq_length": seq, "global_batch": gbs, "rows": [packed, padded],
                              "target_tokens": args.target_tokens}
    if event is None or "error" in packed or "error" in padded:
        result["error"] = "a run failed or the packed run reported no packing event"
        return result
    efficiency = float(event["efficiency"])
    mean_len = efficiency * seq * int(event["sequences"]) / int(event["examples"])
    result.update(packing_efficiency=efficiency, mean_example_tokens=mean_len,
                  padded_efficiency=mean_len / seq)
    for row, per_step in ((packed, gbs * seq * efficiency), (padded, gbs * mean_len)):
        row["nonpad_tokens_per_step"] = per_step
        row["nonpad_tokens_per_s"] = per_step / row["step_s"]
        row["time_to_target_s"] = args.target_tokens / row["nonpad_tokens_per_s"]
        row["time_to_target_loss_tokens_s"] = args.target_tokens / (row["nonpad_tokens_per_s"] * stats["response_share"])
    result["packed_speedup"] = padded["time_to_target_s"] / packed["time_to_target_s"]
    return result


def _have_mode(name: str) -> bool:
    """Whether this checkout has the mode, both halves (DPO is being written alongside this bench)."""
    recipec_pythonpath()
    try:
        from recipec.compiler.modes import MODES
    except ImportError:
        return False
    return name in MODES and importlib.util.find_spec(f"recipec.runtime.modes.{MODES[name]}") is not None


def part_steps(args: argparse.Namespace, work: Path, seq: int, parts: list[str]) -> dict[str, Any]:
    """(b) and (c): a padded SFT step of 16 sequences (micro batch 2) against DPO and distillation."""
    data, pairs = work / "chat_padded.jsonl", work / "preference.jsonl"
    chat_records(data, args.records, seq, seed=1)
    chat_records(pairs, args.records, seq, seed=2, preference=True)
    step = ["train.micro_batch_size=2", f"train.global_batch_size={2 * args.global_batch}", "data.packing=false"]
    teacher = Path(args.out).resolve() / "modes_bench_work" / "teacher_ckpt"
    save = [f"checkpoint.save={json.dumps(str(teacher))}", f"checkpoint.save_interval={args.steps}",
            "checkpoint.keep_last=1"] if "distill" in parts else []
    sft = run_row(args, "sft_step", args.step_recipe, [*base_overrides(args, Path("@OUT@"), data), "train.mode=sft",
                                                       *step, *save])
    result: dict[str, Any] = {"sequences": 2 * args.global_batch, "sft": sft}
    if "dpo" in parts:
        if not _have_mode("dpo"):
            result["dpo"] = {"name": "dpo_step", "skipped": "train.mode dpo is not in this checkout"}
        else:
            result["dpo"] = run_row(args, "dpo_step", args.step_recipe,
                                    [*base_overrides(args, Path("@OUT@"), pairs), "train.mode=dpo", *step])
    if "distill" in parts:
        if not _have_mode("distill"):
            result["distill"] = {"name": "distill_step", "skipped": "train.mode distill is not in this checkout"}
        elif "error" in sft:
            result["distill"] = {"name": "distill_step", "skipped": "the SFT row (the teacher's checkpoint) failed"}
        else:
            result["distill"] = run_row(args, "distill_step", args.step_recipe, [
                *base_overrides(args, Path("@OUT@"), data), "train.mode=distill", *step,
                f"+train.mode_options.teacher_load={json.dumps(str(teacher))}"])
    for key in ("dpo", "distill"):
        row = result.get(key)
        if row and row.get("step_s") and sft.get("step_s"):
            row["vs_sft_step"] = row["step_s"] / sft["step_s"]
    return result


# ---------------------------------------------------------------- report
def table(report: dict[str, Any]) -> str:
    lines = []
    sft = report.get("sft")
    if sft:
        lines += [(f"(a) SFT padded vs packed, seq {sft['seq_length']}, global batch {sft['global_batch']} x micro 1; "
                   f"packing efficiency {fmt(sft.get('packing_efficiency'), '.1%')}, padded "
                   f"{fmt(sft.get('padded_efficiency'), '.1%')}; target {sft['target_tokens']:,} tokens"), "",
                  ("| layout | step (ms) | non-pad tokens/step | non-pad tokens/s | runtime tok/s (all) | "
                   "time to target non-pad (s) | time to target loss tokens (s) | peak mem (GiB) |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in sft["rows"]:
            if "error" in row:
                lines.append(f"| {row['name']} | failed: {row['error']} | | | | | | |")
                continue
            ms = row["step_s"] * 1e3 if row.get("step_s") else None
            lines.append(f"| {row['name']} | {fmt(ms, '.1f')} | {fmt(row.get('nonpad_tokens_per_step'), ',.0f')} | "
                         f"{fmt(row.get('nonpad_tokens_per_s'), ',.0f')} | {fmt(row.get('runtime_tokens_per_s'), ',.0f')} | "
                         f"{fmt(row.get('time_to_target_s'), ',.1f')} | "
                         f"{fmt(row.get('time_to_target_loss_tokens_s'), ',.1f')} | {fmt(row.get('mem_gib'), '.1f')} |")
        if "packed_speedup" in sft:
            lines.append(f"\npacked reaches the target {sft['packed_speedup']:.2f}x sooner")
    steps = report.get("step_rows")
    if steps:
        lines += ["", f"(b, c) step time vs a padded SFT step ({steps['sequences']} sequences, micro batch 2)", "",
                  "| mode | step (ms) | vs SFT | peak mem (GiB) |", "| --- | --- | --- | --- |"]
        for key in ("sft", "dpo", "distill"):
            row = steps.get(key)  # type: ignore[assignment]
            if row is None:
                continue
            if "skipped" in row or "error" in row:
                lines.append(f"| {key} | {row.get('skipped') and 'skipped: ' + row['skipped'] or 'failed: ' + row['error']}"
                             " | | |")
                continue
            lines.append(f"| {key} | {fmt(row['step_s'] * 1e3, '.1f')} | {fmt(row.get('vs_sft_step'), '.2f', 'x')} | "
                         f"{fmt(row.get('mem_gib'), '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--sft-recipe", default="llama32_1b_sft_packed")
    p.add_argument("--step-recipe", default="llama32_1b_sft")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per SFT step (b, c: twice this)")
    p.add_argument("--records", type=int, default=4000, help="generated jsonl records")
    p.add_argument("--target-tokens", type=int, default=100_000_000, help="trained tokens for the time-to column")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/modes_bench")
    p.add_argument("--timeout-s", type=float, default=540.0, help="per launch")
    p.add_argument("--cpu", action="store_true", help="launch.accelerator=cpu, no GPU")
    p.add_argument("--tiny", action="store_true", help="the tiny Llama recipes (with --cpu: the smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--echo", action="store_true", help="print the runs' output as it comes")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown --parts {unknown}; choose from {PARTS}")
    if args.tiny:
        args.sft_recipe = "llama3_tiny_sft_packed" if args.sft_recipe == p.get_default("sft_recipe") else args.sft_recipe
        args.step_recipe = "llama3_tiny_sft_packed" if args.step_recipe == p.get_default("step_recipe") else args.step_recipe
        for name, tiny in (("steps", 5), ("warmup", 2), ("global_batch", 4), ("records", 300),
                           ("target_tokens", 1_000_000)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, tiny)
    seq = 128 if args.tiny else 4096  # the recipes' model.seq_length
    out = Path(args.out).resolve()
    work = out / "modes_bench_work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"parts": parts, "cpu": args.cpu, "tiny": args.tiny, "steps": args.steps,
                              "warmup": args.warmup}
    if "sft" in parts:
        report["sft"] = part_sft(args, work, seq)
    if "dpo" in parts or "distill" in parts:
        report["step_rows"] = part_steps(args, work, seq, parts)
    report["bench_s"] = time.perf_counter() - started
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    (out / "modes_bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nmodes_bench: {', '.join(parts)} on one {'CPU process' if args.cpu else 'GPU'}; {report['bench_s']:.0f} s; "
          f"wrote {out / 'modes_bench.json'}\n")
    print(table(report), flush=True)
    failed = ("error" in report.get("sft", {}) or
              any("error" in r for r in (report.get("step_rows") or {}).values() if isinstance(r, dict)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
