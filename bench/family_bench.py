"""One GPU row per model family: the bundled recipe at a layer count that fits one GPU.

    python bench/family_bench.py [--rows gemma3_1b,gpt_oss_20b@2,...] [--fp8] [--steps 20] [--out DIR]
    python bench/family_bench.py --cpu --tiny       # smoke, CPU (the families' tiny recipes)

Each row is `recipec launch RECIPE` as a user types it, on one GPU with the Transformer Engine
layer spec where TE imports, 8 microbatches per step (what users run), mock data, no checkpoints,
no eval; only the layer count (and, for the MoE families, the expert count) is cut so the model
and Adam fit one GPU. TFLOP/s come from the runtime's own count, which is the compiler's per-family
FLOPs formula (plan.json flops_per_step: MLA, windows, MoE top-k and shared experts included);
MFU is against the accelerator's dense bf16 peak. Memory: the compile-time estimate
(plan.json memory_gib.total) beside the measured peak (torch.cuda.max_memory_allocated, from the
runtime's metrics). The table is printed last; JSON is written under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import failure_reason, fmt, launch, read_jsonl

# row name -> (recipe, overrides that make it fit one GPU). `name@N` sets N layers.
ROWS: dict[str, tuple[str, list[str]]] = {
    "gemma3_1b": ("gemma3_1b", []),
    "gemma3_27b": ("gemma3_27b", ["model.num_layers=6", "model.seq_length=4096"]),  # one 5:1 local/global period
    # 1 dense + 1 MoE layer; 16 of 256 experts (8 groups of 2, top-4 groups, top-8 experts).
    "deepseek_v3": ("deepseek_v3", ["model.num_layers=2", "model.moe_first_k_dense=1", "model.num_moe_experts=16",
                                    "~model.mtp_num_layers"]),
    "gpt_oss_20b": ("gpt_oss_20b", ["model.num_layers=2"]),  # one sliding + one global layer, 32 experts
    "llama32_1b": ("llama32_1b", []),  # the reference row (same harness)
}
TINY = {"gemma3_tiny": ("gemma3_tiny", []), "gpt_oss_tiny": ("gpt_oss_tiny", []),
        "deepseek_v3_tiny": ("deepseek_v3_tiny", [])}
ONE_GPU = ["launch.nodes=1", "launch.gpus_per_node=1", "parallel.tensor_model_parallel_size=1",
           "parallel.pipeline_model_parallel_size=1", "~parallel.virtual_pipeline_model_parallel_size",
           "parallel.context_parallel_size=1", "parallel.expert_model_parallel_size=1",
           "parallel.sequence_parallel=false", "~train.eval_interval", "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last", "~checkpoint.load",
           "~checkpoint.pretrained", "data.kind=mock"]
FP8 = ["precision.fp8=delayed", "precision.fp8_format=hybrid", "precision.fp8_amax_history_len=1024",
       "precision.fp8_amax_compute_algo=max"]


def overrides(extra: list[str], *, steps: int, mbs: int, microbatches: int, interval: int, out: Path,
              cpu: bool, seq: int | None) -> list[str]:
    ov = [*ONE_GPU, *extra, f"train.train_iters={steps}", f"train.micro_batch_size={mbs}",
          f"train.global_batch_size={mbs * microbatches}", f"logging.log_interval={interval}",
          f"scheduler.lr_decay_iters={steps}", f'launch.output_dir="{out}"', "-o", str(out / "build")]
    if seq:
        ov.append(f"model.seq_length={seq}")
    if cpu:
        ov.append("launch.accelerator=cpu")
    return ov


def measure(out: Path, warmup: int) -> dict[str, Any]:
    """Mean over the log windows that start after `warmup` steps, from the runtime's metrics."""
    plan = json.loads((out / "build" / "plan.json").read_text())["plan"]
    rows = [r for r in read_jsonl(out / "metrics.jsonl")
            if "step_time_s" in r and r.get("step", 0) - r.get("window_steps", 1) >= warmup]
    if not rows:
        raise RuntimeError("no throughput record after the warm-up steps")
    step = statistics.fmean(r["step_time_s"] for r in rows)
    tflops = plan["flops_per_step"] / step / plan["world_size"] / 1e12
    return {"step_s": step, "tokens_per_s": plan["tokens_per_step"] / step, "tflops": tflops,
            "mfu": tflops / plan["peak_tflops"] if plan.get("peak_tflops") else None,
            "est_mem_gib": plan["memory_gib"]["total"], "peak_mem_gib": max(r.get("mem_gib", 0.0) for r in rows),
            "params_b": plan["params_total"] / 1e9, "loss": rows[-1].get("loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", help="comma-separated row names (default: every family row)")
    p.add_argument("--fp8", action="store_true", help="also an FP8 (delayed scaling) row per family")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--seq", type=int, help="model.seq_length (default: the recipe's)")
    p.add_argument("--timeout-s", type=float, default=420)
    p.add_argument("--out", type=Path, default=Path("/tmp/family_bench"))
    p.add_argument("--accelerator", help="launch.accelerator of the GPU (e.g. H200-141GB; default: the recipe's)")
    p.add_argument("--cpu", action="store_true", help="launch.accelerator=cpu")
    p.add_argument("--tiny", action="store_true", help="the families' tiny recipes (smoke)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipec override added to every row (repeatable), e.g. model.moe_grouped_gemm=false")
    args = p.parse_args(argv)
    table = TINY if args.tiny else ROWS
    names = args.rows.split(",") if args.rows else list(table)
    results: list[dict[str, Any]] = []
    for name in names:
        if name not in table:
            print(f"family_bench: unknown row {name!r}; rows: {', '.join(table)}", file=sys.stderr)
            return 2
        for precision in (["bf16", "fp8"] if args.fp8 and not args.cpu else ["bf16"]):
            recipe, extra = table[name]
            out = (args.out / f"{name}-{precision}").resolve()
            shutil.rmtree(out, ignore_errors=True)
            gpu = [f"launch.accelerator={args.accelerator}"] if args.accelerator and not args.cpu else []
            ov = overrides(extra + gpu + (FP8 if precision == "fp8" else []) + args.override,
                           steps=args.steps, mbs=args.mbs,
                           microbatches=args.microbatches, interval=1 if args.cpu else 5, out=out, cpu=args.cpu,
                           seq=args.seq)
            print(f"family_bench: {name} {precision}", file=sys.stderr, flush=True)
            run = launch(recipe, ov, cwd=out, cpu=args.cpu, timeout_s=args.timeout_s, log_path=out.parent /
                         f"{name}-{precision}.log")
            row: dict[str, Any] = {"row": name, "precision": precision, "rc": run.rc}
            if run.rc == 0:
                try:
                    row.update(measure(out, min(args.warmup, args.steps - 1)))
                except (RuntimeError, OSError, KeyError, ValueError) as exc:
                    row["error"] = f"no measurement: {exc}"
            else:
                row["error"] = failure_reason(run.text)[:300]
            results.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family_bench.json").write_text(json.dumps(results, indent=2))
    head = f"{'row':<18} {'prec':<5} {'params':>8} {'ms/step':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} " \
           f"{'est GiB':>8} {'peak GiB':>9}"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['row']:<18} {r['precision']:<5} failed (exit {r['rc']}): {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['row']:<18} {r['precision']:<5} {r['params_b']:7.3f}B {r['step_s'] * 1e3:9.1f} "
              f"{r['tokens_per_s']:9.0f} {fmt(r['tflops'], '.1f'):>8} {mfu:>6} {r['est_mem_gib']:8.1f} "
              f"{r['peak_mem_gib']:9.1f}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
