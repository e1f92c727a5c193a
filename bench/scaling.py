"""Multi-GPU scaling harness: one recipe at DP, TP, PP and CP layouts on 1, 2, 4, 8 GPUs.

    python bench/scaling.py [RECIPE] [--gpus 1,2,4,8] [--layouts dp,tp,pp,cp] [--steps 30] [--warmup 10]
                            [--log-interval 5] [--micro-batch 1] [--global-batch B] [--seq S]
                            [--cpu] [--out DIR] [--json FILE] [--timeout-s S] [--dry-run] [OVERRIDE ...]

What it runs. Every (layout, GPU count) is one `recipec launch` (torchrun, nccl on GPUs; with
--cpu, gloo processes on this machine's CPU) in its own directory `<out>/<layout>-<n>/` (build/,
run/ with the run's metrics.jsonl, launch.log with everything the launch printed). The layout
sets one parallel size to n and the others to 1 (`dp`: TP=PP=CP=1, so DP=n). At one GPU every
layout is the same run, so it runs once: that is the baseline every row is compared with.

Strong scaling: the global batch (sequences x seq length tokens per step) is the same for every
row, so more GPUs should mean the same step done faster. By default it is micro batch x
lcm(8, largest count): at one GPU that is at least 8 microbatches per step, as users run, and
every data-parallel size divides it. Each run is mock data, no checkpoints, no evaluation.

What is measured. The runtime's own throughput records in metrics.jsonl (runtime/metrics.py):
one per log window (--log-interval steps), the mean step time of the window, timed with a device
sync at its end. Windows that start before --warmup steps are dropped; the rest give the step
time. tokens/s = tokens per step / step time; TFLOP/s per GPU = the compiler's FLOPs per step
(plan.json's flops_per_step, Megatron's formula, the count the runtime logs) / step time / GPUs;
MFU against plan.json's peak_tflops (the accelerator's dense bf16 peak; unknown on CPU: "n/a").
efficiency = (tokens/s per GPU) / (1-GPU tokens/s): 1.00 is perfect strong scaling.

What cannot run is a row, never a crash. A layout the compiler or the launch preflight refuses
(exit 2: TP larger than the heads, PP that does not divide the layers, CP on Megatron-Core's local
modules, more GPUs than this machine has) is "skipped: <the reason recipec gave>"; any other
failure is "failed (exit N): <its last error line>" with the log next to it. The table is printed
last (stdout; progress goes to stderr) and the same rows are written as JSON (--json, default
<out>/scaling.json). Exit 0 when the 1-GPU baseline ran, 1 when it did not, 2 for bad arguments.

OVERRIDEs are recipec's dotted overrides (key=value, +key=value, ~key), applied after this
script's run settings and before the layout and output directories, which stay the harness's.
The GPU default is the bundled `llama32_1b` (Llama-3.2-1B, the shape bench/gpu_bench.py uses) at
seq 4096; --cpu defaults to `llama3_tiny` at its own seq (128). The accelerator is detected from
`nvidia-smi -L` (H100, H200, A100 80GB, B200) unless an override sets launch.accelerator.

Standard library only (torch is imported by the ranks, not here), so --help is instant; the
recipec CLI runs as `python -m recipec.compiler.cli` from this interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import failure_reason, recipec_pythonpath

LAYOUTS = {"dp": None, "tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
           "cp": "context_parallel_size"}
PARALLEL_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
# `nvidia-smi -L` name fragment -> compiler/hardware.py accelerator (the memory check and the MFU peak)
ACCELERATOR_NAMES = (("H200", "H200-141GB"), ("H100", "H100-80GB"), ("B200", "B200-180GB"),
                     ("A100-SXM4-80GB", "A100-80GB"), ("A100 80GB", "A100-80GB"), ("A100-PCIE-80GB", "A100-80GB"))
MARKER = ".scaling-run"  # written into each run directory, so only those are ever removed


class UsageError(Exception):
    """A bad command line: printed as one line, exit 2."""


# ---------------------------------------------------------------- this machine

def nvidia_gpus() -> tuple[int, str | None]:
    """(GPUs listed by `nvidia-smi -L`, the recipec accelerator name of the first one, if known)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0, None
    listed = [line for line in out.splitlines() if line.startswith("GPU ")]
    name = next((acc for frag, acc in ACCELERATOR_NAMES if listed and frag in listed[0]), None)
    return len(listed), name


def recipec_cli() -> tuple[list[str], dict[str, str]]:
    """The recipec CLI as a command for this interpreter, and the environment it needs: installed,
    `python -m recipec.compiler.cli`; from a plain checkout (a GPU machine with no install), the
    same through a `recipec` package of symlinks to this checkout on PYTHONPATH (the ranks inherit it)."""
    env = dict(os.environ)
    root = recipec_pythonpath()
    if root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "recipec.compiler.cli"], env


# ---------------------------------------------------------------- what to run

def toml_string(text: str) -> str:
    """A TOML basic string for an override value (JSON's escapes are valid TOML)."""
    return json.dumps(text)


def base_overrides(args: argparse.Namespace, accelerator: str | None) -> list[str]:
    """The settings every row shares: batch sizes, steps, logging, mock data, nothing saved."""
    ov = [
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}",
        f"train.train_iters={args.steps}",
        f"logging.log_interval={args.log_interval}",
        "~train.eval_interval",
        "data.kind=mock",
        "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last",
        "launch.nodes=1",
    ]
    if args.seq:
        ov.append(f"model.seq_length={args.seq}")
    if args.cpu:
        ov.append('launch.accelerator="cpu"')
    elif accelerator:
        ov.append(f"launch.accelerator={toml_string(accelerator)}")
    return ov


def layout_sizes(layout: str, n: int) -> dict[str, int]:
    sizes = dict.fromkeys(PARALLEL_KEYS, 1)
    if LAYOUTS[layout]:
        sizes[LAYOUTS[layout]] = n
    return sizes


def launch_argv(cli: list[str], args: argparse.Namespace, base: list[str], layout: str, n: int,
                run_dir: Path) -> list[str]:
    layout_ov = [f"parallel.{key}={value}" for key, value in layout_sizes(layout, n).items()]
    return [*cli, "launch", args.recipe, *base, *args.overrides, *layout_ov,
            f"launch.output_dir={toml_string(str(run_dir / 'run'))}",
            "--gpus-per-node", str(n), "-o", str(run_dir / "build")]


def fresh_dir(path: Path, remove: bool) -> None:
    """An empty run directory: metrics.jsonl appends, so an old run's lines must not be read.
    Only a directory this script made (it holds MARKER) is removed; `remove=False` only checks."""
    if path.exists():
        if not (path / MARKER).exists():
            raise UsageError(f"{path} exists and is not a run directory of this script; choose another --out")
        if not remove:
            return
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by bench/scaling.py; removed and rewritten by its next run\n")


# ---------------------------------------------------------------- running and reading

one_line_reason = failure_reason  # what a row says when its launch failed


def run_launch(argv: list[str], env: dict[str, str], run_dir: Path, timeout_s: float) -> tuple[int, str]:
    """Run one `recipec launch` in its own session (so a timeout can stop all its ranks);
    (exit code, everything it printed, also kept in launch.log)."""
    log_path = run_dir / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except KeyboardInterrupt:  # the launch is in its own session: Ctrl-C does not reach it by itself
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            raise
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the supervisor stops its ranks
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = 124
            log.write(f"\nbench/scaling.py: error: stopped after --timeout-s {timeout_s:g} s\n")
    return code, log_path.read_text(errors="replace")


def measure(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Step time over the log windows that start at or after `warmup`, and what follows from it."""
    plan = json.loads((run_dir / "build" / "plan.json").read_text())["plan"]
    metrics = run_dir / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    windows = [(r["step_time_s"], r["window_steps"]) for r in records
               if "step_time_s" in r and r["step"] - r["window_steps"] >= warmup]
    if not windows:
        raise RuntimeError(f"no throughput record after the {warmup} warm-up steps in {metrics}")
    steps = sum(n for _, n in windows)
    step_time = sum(t * n for t, n in windows) / steps
    world = plan["world_size"]
    tflops = plan["flops_per_step"] / step_time / world / 1e12
    tokens = plan["tokens_per_step"] / step_time
    return {"steps_timed": steps, "step_time_s": step_time, "tokens_per_s": tokens,
            "tokens_per_s_per_gpu": tokens / world, "tflops_per_gpu": tflops,
            "mfu": tflops / plan["peak_tflops"] if plan["peak_tflops"] else None,
            "data_parallel_size": plan["data_parallel_size"],
            "microbatches_per_step": plan["microbatches_per_step"]}


def run_one(cli: list[str], env: dict[str, str], args: argparse.Namespace, base: list[str], layout: str,
            n: int) -> dict[str, Any]:
    run_dir = (args.out / f"{layout}-{n}").resolve()
    fresh_dir(run_dir, remove=True)
    argv = launch_argv(cli, args, base, layout, n, run_dir)
    print(f"scaling: {layout} x{n}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    code, log = run_launch(argv, env, run_dir, args.timeout_s)
    row: dict[str, Any] = {"layout": layout, "gpus": n, **layout_sizes(layout, n), "run_dir": str(run_dir),
                           "wall_s": round(time.monotonic() - started, 1), "exit_code": code}
    if code == 0:
        try:
            row.update(status="ok", reason=None, **measure(run_dir, args.warmup))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            row.update(status="failed", reason=f"ran, but no measurement: {exc}")
    else:
        row.update(status="skipped" if code == 2 else "failed", reason=one_line_reason(log))
    print(f"scaling: {layout} x{n}: {row['status']} in {row['wall_s']} s"
          + (f": {row['reason']}" if row["reason"] else f", {row['tokens_per_s']:,.0f} tokens/s"),
          file=sys.stderr, flush=True)
    return row


def with_efficiency(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    base = baseline.get("tokens_per_s") if baseline.get("status") == "ok" else None
    for row in rows:
        row["efficiency"] = row["tokens_per_s_per_gpu"] / base if base and row["status"] == "ok" else None


# ---------------------------------------------------------------- output

def table(rows: list[dict[str, Any]]) -> str:
    head = ("layout", "GPUs", "TP", "PP", "CP", "DP", "ms/step", "tokens/s", "tok/s/GPU", "TFLOP/s/GPU", "MFU",
            "efficiency")
    body = []
    for r in rows:
        cells = [r["layout"], str(r["gpus"]), *(str(r[k]) for k in PARALLEL_KEYS)]
        if r["status"] == "ok":
            mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
            eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "n/a"
            cells += [str(r["data_parallel_size"]), f"{r['step_time_s'] * 1000:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s_per_gpu']:.1f}", f"{r['tflops_per_gpu']:.3f}", mfu, eff]
            body.append(cells)
        else:
            label = "skipped" if r["status"] == "skipped" else f"failed (exit {r['exit_code']})"
            body.append([*cells, "-", f"{label}: {r['reason']}"])
    # a skipped row's last cell (the reason) runs on past the columns; it does not set a width
    widths = [max([len(head[i])] + [len(c[i]) for c in body if len(c) > i + 1]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i > 0 else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(list(head)), line(["-" * w for w in widths]), *(line(c) for c in body)])


# ---------------------------------------------------------------- command line

def counts(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU counts like 1,2,4,8") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU counts >= 1, like 1,2,4,8")
    return values


def layouts(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in LAYOUTS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: layouts are {','.join(LAYOUTS)}")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="bundled recipe name or .toml path (default: llama32_1b; llama3_tiny with --cpu)")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="recipec dotted overrides passed through")
    p.add_argument("--gpus", type=counts, help="GPU counts (default: 1,2,4,8 up to the GPUs `nvidia-smi -L` lists; "
                   "with --cpu: 1,2). 1 always runs: it is the baseline")
    p.add_argument("--layouts", type=layouts, default=list(LAYOUTS), help="of dp,tp,pp,cp (default: all)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--warmup", type=int, help="steps not timed (default: a third of --steps)")
    p.add_argument("--log-interval", type=int, help="steps per throughput window (default 5; 1 with --cpu)")
    p.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch_size (default 1)")
    p.add_argument("--global-batch", type=int, help="train.global_batch_size, fixed for every row "
                   "(default: micro batch x lcm(8, largest GPU count))")
    p.add_argument("--seq", type=int, help="model.seq_length (default 4096 on GPUs; the recipe's with --cpu)")
    p.add_argument("--cpu", action="store_true", help="gloo processes on this CPU instead of GPUs (a tiny recipe)")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"), help="run directories (default runs/scaling)")
    p.add_argument("--json", type=Path, help="write the rows here (default <out>/scaling.json)")
    p.add_argument("--timeout-s", type=float, default=1800, help="per launch (default 1800)")
    p.add_argument("--dry-run", action="store_true", help="print the launch commands; run nothing")
    args = p.parse_intermixed_args(argv)
    if args.recipe and (args.recipe[0] in "+~" or "=" in args.recipe):  # an override, no recipe named
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    args.recipe = args.recipe or ("llama3_tiny" if args.cpu else "llama32_1b")
    args.log_interval = args.log_interval or (1 if args.cpu else 5)
    args.warmup = args.steps // 3 if args.warmup is None else args.warmup
    if args.seq is None and not args.cpu:
        args.seq = 4096
    for name in ("steps", "log_interval", "micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    first_timed = -(-args.warmup // args.log_interval) * args.log_interval  # the first window after warm-up
    if args.warmup < 0 or first_timed + args.log_interval > args.steps:
        p.error(f"--steps {args.steps} leaves no full --log-interval {args.log_interval} window after "
                f"--warmup {args.warmup}; raise --steps or lower --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found, accelerator = (0, None) if args.cpu else nvidia_gpus()
    if args.gpus is None:
        args.gpus = [1, 2] if args.cpu else [n for n in (1, 2, 4, 8) if n <= max(found, 1)]
    gpu_counts = sorted({1, *args.gpus})
    if args.global_batch is None:
        args.global_batch = args.micro_batch * math.lcm(8, gpu_counts[-1])
    bad = [n for n in gpu_counts if args.global_batch % (args.micro_batch * n)]
    if bad:
        print(f"scaling: error: --global-batch {args.global_batch} is not divisible by micro batch "
              f"{args.micro_batch} x {bad[0]} GPUs (data-parallel); use a multiple of "
              f"{args.micro_batch * math.lcm(*gpu_counts)}", file=sys.stderr)
        return 2
    if any(o.startswith("launch.accelerator=") for o in args.overrides):
        accelerator = None  # the user's wins (it comes later anyway); do not claim a detection
    base = base_overrides(args, accelerator)
    cli, env = recipec_cli()
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    plan = [("dp", 1)] + [(layout, n) for layout in args.layouts for n in gpu_counts if n > 1]
    if args.dry_run:
        for layout, n in plan:
            print(shlex.join(launch_argv(cli, args, base, layout, n, (args.out / f"{layout}-{n}").resolve())))
        return 0
    try:
        for layout, n in plan:  # before anything runs, not after an hour of it
            fresh_dir((args.out / f"{layout}-{n}").resolve(), remove=False)
    except UsageError as exc:
        print(f"scaling: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(layout, n): run_one(cli, env, args, base, layout, n) for layout, n in plan}
    baseline = done[("dp", 1)]
    rows = []
    for layout in args.layouts:
        for n in gpu_counts:
            row = dict(done[(layout, n)] if n > 1 else baseline, layout=layout)
            if n == 1 and layout != "dp":
                row["note"] = "the 1-GPU baseline (every layout is TP=PP=CP=1 at one GPU)"
            rows.append(row)
    with_efficiency(rows, baseline)
    seq_note = f"seq {args.seq}" if args.seq else "the recipe's seq length"
    scaling = (f"strong scaling: global batch {args.global_batch} sequences ({seq_note}) per step for every row, "
               f"micro batch {args.micro_batch}; {args.steps} steps, first {args.warmup} not timed")
    report = {"scaling": "strong", "description": scaling, "recipe": args.recipe, "overrides": args.overrides,
              "global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch, "seq_length": args.seq,
              "steps": args.steps, "warmup_steps": args.warmup, "log_interval": args.log_interval,
              "cpu": args.cpu, "gpus_found": found, "accelerator": "cpu" if args.cpu else accelerator, "rows": rows}
    json_path = args.json or args.out / "scaling.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    sys.stderr.flush()
    print(f"\n{args.recipe}: {scaling}.\nefficiency = (tokens/s per GPU) / (1-GPU tokens/s); at 1 GPU every layout "
          f"is the one baseline run. Runs: {args.out}/<layout>-<n>/, JSON: {json_path}")
    print(table(rows))
    return 0 if baseline["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
