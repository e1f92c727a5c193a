"""Checkpoints measured against the disk: training stall per save, background write throughput
against `dd` on the same file system, and the load time on resume.

    python bench/ckpt_bench.py [--shapes 1b,8b] [--modes sync,async] [--dir /fs/to/test] [--out DIR]
    python bench/ckpt_bench.py --cpu --tiny                                  # smoke, CPU

For each shape x mode, two `recipec launch` runs, as a user runs them:

1. train: --saves x --save-interval steps with checkpoint.save_interval=--save-interval,
   keep_last=1, logging.log_interval=1 (a step time per step in metrics.jsonl), async_save on or
   off. A thread watches the checkpoint directory from outside: a save starts when `.tmp_iter_N`
   appears and is complete when `iter_N` appears (renamed into place after every file is written,
   fsynced and hashed); iter_N's size is taken then.
2. resume: the same recipe with train_iters + 2 and checkpoint.load= that directory (no save): the
   runtime's `resumed from ... loaded in X s` line gives the load (and verify) time.

Per save (the final one excluded from the stall: no step is timed after it):
- stall: measured, the step-time excess over the median step (bench/_common.save_stalls: "first"
  is the pause in the step after the save, "total" adds the excess of every step up to the next
  save, so background work that slows training counts); and the runtime's own figure from its log.
- background write throughput: checkpoint bytes / (iter_N appeared - .tmp_iter_N appeared), the
  whole save as the file system sees it, against `dd if=/dev/zero of=DIR bs=1M count=N
  conv=fsync` on the same directory (target >= 70%).
Targets (issue 15): stall < 2 s per save, throughput >= 70% of dd.

Shapes (one GPU, mock data, 8 microbatches per step as users run):
  1b   llama32_1b at seq 4096, micro batch 2 (checkpoint ~14 B/param: bf16 weights, fp32 master,
       two fp32 Adam moments: ~17 GB).
  8b   llama3_8b's layer shape (hidden 4096, ffn 14336, vocab 128256, untied) with
       --layers-8b layers (default 2: ~1.5 B params, ~21 GB) at seq 8192, micro batch 1.
keep_last=1 still holds two checkpoints while the newer one completes: a case needs about
2 x its checkpoint free on --dir, and is skipped with the reason when the disk has less.
Prints a table last; writes ckpt_bench.json under --out.
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
from _common import (
    CheckpointWatcher,
    dd_throughput,
    failure_reason,
    fmt,
    gbps,
    launch,
    per_step_times,
    read_jsonl,
    recipec_pythonpath,
    resume_event,
    save_events,
    save_stalls,
    startup_breakdown,
)

STALL_TARGET_S = 2.0
THROUGHPUT_TARGET = 0.70
BYTES_PER_PARAM = 14  # bf16 weights 2 + fp32 master 4 + Adam moments 8 (the distributed optimizer's state)

SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"recipe": "llama32_1b", "overrides": ["model.seq_length=4096", "train.micro_batch_size=2"]},
    "8b": {"recipe": "llama3_8b", "overrides": ["model.seq_length=8192", "train.micro_batch_size=1"]},
    "tiny": {"recipe": "llama3_tiny", "overrides": ["launch.accelerator=cpu", "train.micro_batch_size=2",
                                                    "model.seq_length=64"]},
}


def overrides(args: argparse.Namespace, shape: str, mode: str, ckpt: Path, out_dir: Path, resume: bool) -> list[str]:
    spec = SHAPES[shape]
    mbs = int(next(o for o in spec["overrides"] if o.startswith("train.micro_batch_size=")).split("=")[1])
    steps = args.saves * args.save_interval
    ov = [*spec["overrides"], f"train.global_batch_size={mbs * args.microbatches}",
          "launch.nodes=1", "launch.gpus_per_node=1", "parallel.tensor_model_parallel_size=1",
          "parallel.pipeline_model_parallel_size=1", "parallel.context_parallel_size=1",
          "logging.log_interval=1", "~train.eval_interval", f'launch.output_dir="{out_dir}"',
          f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
          # the resumed run's LR schedule is this run's (a resume that changes it would only warn)
          f"scheduler.lr_decay_iters={steps + 2}"]
    if shape == "8b":
        ov.append(f"model.num_layers={args.layers_8b}")
    if shape != "tiny":
        ov.append("data.kind=mock")
    if resume:
        ov += [f"train.train_iters={steps + 2}", f'checkpoint.load="{ckpt}"', "~checkpoint.save",
               "~checkpoint.save_interval", "~checkpoint.keep_last"]
    else:
        ov += [f"train.train_iters={steps}", f'checkpoint.save="{ckpt}"', f"checkpoint.save_interval={args.save_interval}",
               "checkpoint.keep_last=1", "~checkpoint.load"]
    return ov + list(args.override)


def estimate_bytes(shape: str, args: argparse.Namespace) -> int | None:
    """The checkpoint's size from the compiled plan's parameter count (no torch needed)."""
    try:
        from recipec.compiler.api import build

        ov = [o for o in overrides(args, shape, "sync", Path("/nonexistent"), Path("/nonexistent"), False)]
        return int(build(SHAPES[shape]["recipe"], ov).plan.params_total) * BYTES_PER_PARAM
    except Exception as exc:  # noqa: BLE001 - an estimate only; the case still runs
        print(f"ckpt_bench: no size estimate for {shape}: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_case(args: argparse.Namespace, shape: str, mode: str, fs: Path, out: Path) -> dict[str, Any]:
    name = f"{shape}-{mode}"
    ckpt, out_dir = fs / f"ckpt_bench_{name}" / "checkpoints", fs / f"ckpt_bench_{name}" / "run"
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    res: dict[str, Any] = {"shape": shape, "mode": mode, "recipe": SHAPES[shape]["recipe"]}
    est = estimate_bytes(shape, args)
    free = shutil.disk_usage(fs).free
    res.update(est_bytes=est, free_bytes=free)
    if est and free < 2.1 * est:
        res["skipped"] = (f"needs ~{2.1 * est / 1e9:.0f} GB free on {fs} (keep_last=1 holds two checkpoints while "
                          f"one completes), has {free / 1e9:.0f} GB")
        return res
    print(f"\n=== ckpt_bench {name}: train with {args.saves} saves every {args.save_interval} steps", flush=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    watcher = CheckpointWatcher(ckpt, t0)
    watcher.start()
    echo = (lambda t, line: print(f"{t:8.2f} {line}", flush=True)) if args.echo else None
    try:
        train = launch(SHAPES[shape]["recipe"], overrides(args, shape, mode, ckpt, out_dir, False), cwd=fs,
                       cpu=args.cpu, timeout_s=args.timeout_s, log_path=out / f"ckpt_bench_{name}_train.log",
                       on_line=echo)
    finally:
        watcher.stop()
    rows = read_jsonl(out_dir / "metrics.jsonl")
    times = per_step_times(rows)
    interval = args.save_interval
    saves = [s for s in range(interval, args.saves * interval + 1, interval)]
    median, stalls = save_stalls(times, saves[:-1], interval)
    reported = {}
    for ev in save_events(train.text):
        if ev["step"] is None:
            continue
        r = reported.setdefault(ev["step"], {"stall_s": None, "size_bytes": None, "rates_Bps": []})
        r["stall_s"] = ev["stall_s"] if ev["stall_s"] is not None else r["stall_s"]
        r["size_bytes"] = ev["size_bytes"] or r["size_bytes"]
        r["rates_Bps"] += ev["rates_Bps"]
    per_save = []
    for s in saves:
        started, done = watcher.started.get(s), watcher.completed.get(s)
        size = watcher.sizes.get(s)
        seconds = done - started if started is not None and done is not None else None
        stall = next((x for x in stalls if x["step"] == s), {})
        rep = reported.get(s, {})
        per_save.append({"step": s, "bytes": size, "save_to_complete_s": seconds,
                         "Bps": size / seconds if size and seconds else None,
                         "stall_first_s": stall.get("first_s"), "stall_total_s": stall.get("total_s"),
                         "reported_stall_s": rep.get("stall_s"), "reported_rates_Bps": rep.get("rates_Bps", []),
                         "reported_bytes": rep.get("size_bytes")})
    res.update(train_rc=train.rc, train_wall_s=train.wall_s, median_step_s=median, saves=per_save, interval=interval,
               startup=startup_breakdown(rows, train.text), step_times=times)
    if train.rc != 0:
        res["error"] = f"train launch exited {train.rc}: {failure_reason(train.text)}"
        res["tail"] = train.tail()
        print(train.tail(), flush=True)
        return res
    print(f"=== ckpt_bench {name}: resume", flush=True)
    metrics = out_dir.parent / "resume" / "metrics.jsonl"
    again = launch(SHAPES[shape]["recipe"], overrides(args, shape, mode, ckpt, out_dir.parent / "resume", True),
                   cwd=fs, cpu=args.cpu, timeout_s=args.timeout_s, log_path=out / f"ckpt_bench_{name}_resume.log",
                   on_line=echo)
    res.update(resume_rc=again.rc, resume_wall_s=again.wall_s, resume=resume_event(again.text),
               resume_startup=startup_breakdown(read_jsonl(metrics), again.text),
               resume_first_step_line_s=again.first_step_s())
    if again.rc != 0:
        res["error"] = f"resume launch exited {again.rc}: {failure_reason(again.text)}"
        res["tail"] = again.tail()
        print(again.tail(), flush=True)
    if not args.keep:
        shutil.rmtree(ckpt.parent, ignore_errors=True)
    return res


def summarize(res: dict[str, Any], dd_Bps: float | None) -> dict[str, Any]:
    """Means over the periodic saves of one case; the run's final save (portable format, waited for
    at the end, nothing left to stall) on its own; and what reserving the first save's pinned
    memory (runtime/pinned_staging.py) cost the steps before that save."""
    all_saves = res.get("saves", [])
    saves, final = all_saves[:-1], (all_saves[-1] if all_saves else {})
    stalls = [s["stall_total_s"] for s in saves if s["stall_total_s"] is not None]
    firsts = [s["stall_first_s"] for s in saves if s["stall_first_s"] is not None]
    reported = [s["reported_stall_s"] for s in saves if s["reported_stall_s"] is not None]
    rates = [s["Bps"] for s in saves if s["Bps"]]
    seconds = [s["save_to_complete_s"] for s in saves if s["save_to_complete_s"]]
    sizes = [s["bytes"] for s in all_saves if s["bytes"]]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    out = {"stall_total_s": mean(stalls), "stall_max_s": max(stalls) if stalls else None,
           "stall_first_s": mean(firsts), "reported_stall_s": mean(reported),
           "reported_stall_max_s": max(reported) if reported else None, "Bps": mean(rates),
           "bytes": mean(sizes), "saves_seen": len(sizes), "save_to_complete_s": mean(seconds),
           "final_pause_s": final.get("reported_stall_s"), "final_save_to_complete_s": final.get("save_to_complete_s"),
           "interval_s": res["median_step_s"] * res["interval"] if res.get("median_step_s") else None}
    out["vs_dd"] = out["Bps"] / dd_Bps if out["Bps"] and dd_Bps else None
    times, median = res.get("step_times") or {}, res.get("median_step_s")
    before_first = [times[j] - median for j in range(2, res.get("interval", 0)) if j in times] if median else []
    out["reserve_cost_s"] = sum(before_first) if before_first else None
    return out


def table(report: dict[str, Any]) -> str:
    dd = report["dd"]
    lines = [f"dd on {report['dir']}: {dd.get('command')} -> {gbps(dd.get('Bps'))} GB/s",
             "",
             "Periodic saves (the run's last, portable save in its own columns):",
             "",
             ("| shape | async_save | ckpt (GB) | saves | median step (s) | between saves (s) | save→complete (s) | "
              "stall, step after save (s) | stall incl. later steps (s), mean / max | runtime's pause (s), mean / max | "
              "save→complete write (GB/s) | vs dd | steps before the first save, excess (s) | final save: pause / "
              "to complete (s) | resume load (s) | resume verify (s) | stall < 2 s | >= 70% dd |"),
             "| --- | --- |" + " ---: |" * 14 + " --- | --- |"]
    for r in report["cases"]:
        head = f"| {r['shape']} | {'on' if r['mode'] == 'async' else 'off'} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} |" + " |" * 15)
            continue
        if "error" in r and not r.get("saves"):
            lines.append(f"{head} failed: {r['error']} |" + " |" * 15)
            continue
        s = r["summary"]
        rs = r.get("resume") or {}
        worst = max((x for x in (s["stall_max_s"], s["reported_stall_max_s"]) if x is not None), default=None)
        ok_stall = "—" if worst is None else ("yes" if worst < STALL_TARGET_S else "**no**")
        ok_dd = "—" if s["vs_dd"] is None else ("yes" if s["vs_dd"] >= THROUGHPUT_TARGET else "**no**")
        lines.append(
            f"{head} {gbps(s['bytes'])} | {s['saves_seen']} | {fmt(r.get('median_step_s'), '.3f')} | "
            f"{fmt(s['interval_s'], '.1f')} | {fmt(s['save_to_complete_s'])} | "
            f"{fmt(s['stall_first_s'])} | {fmt(s['stall_total_s'])} / {fmt(s['stall_max_s'])} | "
            f"{fmt(s['reported_stall_s'])} / {fmt(s['reported_stall_max_s'])} | {gbps(s['Bps'])} | "
            f"{fmt(s['vs_dd'] and s['vs_dd'] * 100, '.0f', '%')} | {fmt(s['reserve_cost_s'])} | "
            f"{fmt(s['final_pause_s'])} / {fmt(s['final_save_to_complete_s'])} | "
            f"{fmt(rs.get('load_s'))} | {fmt(rs.get('verify_s'))} | {ok_stall} | {ok_dd} |"
            + (f" ({r['error']})" if "error" in r else ""))
    lines.append("\n(a save that completes later than the next one starts makes that one wait: compare "
                 "'between saves' with 'save→complete')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--modes", default="sync,async", help="sync (checkpoint.async_save=false), async (true)")
    p.add_argument("--dir", default=None,
                   help="file system to test: checkpoints and dd go here (default: $TMPDIR or /tmp, not --out: "
                        "$OUT on the device machine is copied back)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/ckpt_bench")
    p.add_argument("--saves", type=int, default=3, help="saves per train run (the last at its final step)")
    p.add_argument("--save-interval", type=int, default=15, help="steps between saves")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--layers-8b", type=int, default=2, help="layers of the 8b shape (disk: ~14 B/param twice)")
    p.add_argument("--dd-mib", type=int, default=4096, help="MiB dd writes")
    p.add_argument("--override", action="append", default=[], help="one more recipe override (repeatable)")
    p.add_argument("--timeout-s", type=float, default=540.0, help="per launch")
    p.add_argument("--deadline-s", type=float, default=0.0, help="skip cases not started within this many seconds")
    p.add_argument("--cpu", action="store_true", help="launch.accelerator=cpu, no GPU")
    p.add_argument("--tiny", action="store_true", help="the tiny recipe (with --cpu: the smoke test)")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and run directories")
    p.add_argument("--echo", action="store_true", help="print the runs' output as it comes")
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes = "tiny"
        args.microbatches = min(args.microbatches, 2)
        args.save_interval = min(args.save_interval, 4)
        args.dd_mib = min(args.dd_mib, 16)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [s for s in shapes if s not in SHAPES] + [m for m in modes if m not in ("sync", "async")]
    if bad:
        p.error(f"unknown shape or mode {bad}; shapes {sorted(SHAPES)}, modes sync, async")
    recipec_pythonpath()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fs = Path(args.dir or os.environ.get("TMPDIR") or "/tmp").resolve() / f"ckpt_bench_fs_{os.getpid()}"
    dd = dd_throughput(fs, args.dd_mib)
    print(f"ckpt_bench: dd {dd['bytes'] / 2**20:.0f} MiB in {dd['seconds']:.2f} s = {gbps(dd['Bps'])} GB/s on {fs}",
          flush=True)
    report: dict[str, Any] = {"dir": str(fs), "dd": dd, "args": vars(args), "cases": []}
    for shape in shapes:
        for mode in modes:
            if args.deadline_s and time.perf_counter() - started > args.deadline_s:
                res: dict[str, Any] = {"shape": shape, "mode": mode, "skipped": "bench deadline reached"}
            else:
                res = run_case(args, shape, mode, fs, out)
            if "skipped" not in res:
                res["summary"] = summarize(res, dd.get("Bps"))
            report["cases"].append(res)
            (out / "ckpt_bench.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(fs, ignore_errors=True)
    report["bench_s"] = time.perf_counter() - started
    (out / "ckpt_bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nckpt_bench: {report['bench_s']:.0f} s; wrote {out / 'ckpt_bench.json'}; stall = step-time excess over "
          f"the median step; write = checkpoint bytes / (iter_N renamed into place - .tmp_iter_N created)\n")
    print(table(report), flush=True)
    return 0 if all("error" not in r for r in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
