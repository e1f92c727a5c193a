"""Per-step metrics: the console progress line, metrics.jsonl and TensorBoard.

Throughput is model FLOPs from the compiler's plan (Megatron's formula) over
wall time; MFU is that against the accelerator's dense peak from the plan.

The progress line is one line per log interval from rank 0, with what a person can act on:
ms/step and tokens/s always; TFLOP/s and MFU only where the accelerator's peak is known
(compiler/hardware.py: not for "cpu", where "0.0 TFLOP/s/GPU" said nothing true); memory on
CUDA; skipped steps only when there were any. metrics.jsonl keeps every field either way.

Start-up (`StartupTimer`): the runtime times its set-up phases and, after the first completed
step, rank 0 logs one line and writes one {"event": "startup", ...} record (see `startup_line`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from recipec.compiler.plan import Plan

log = logging.getLogger("recipec.runtime")


class Meter:
    """Accumulates steps between log lines; only the logging rank writes."""

    def __init__(self, plan: Plan, out_dir: Path, world_size: int, tensorboard_dir: str | None,
                 writer: bool) -> None:
        self.flops_per_step = plan.flops_per_step
        self.tokens_per_step = plan.tokens_per_step
        self.peak = plan.peak_tflops
        self.world = world_size
        self.writer = writer
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.skipped = 0
        self.jsonl = open(out_dir / "metrics.jsonl", "a") if writer else None  # noqa: SIM115
        self.tb = None
        if writer and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                log.warning("tensorboard is not installed; logging.tensorboard_dir is ignored")

    def record(self, step: int, loss: float, lr: float, grad_norm: float | None, skipped: bool,
               extra: dict[str, float] | None = None) -> None:
        """One step's record; `extra`: the training mode's further metrics (runtime/modes/base.py)."""
        self.window_steps += 1
        self.skipped += int(skipped)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                         **(extra or {})}) + "\n")
            self.jsonl.flush()

    def event(self, record: dict[str, Any]) -> None:
        """A record that is not a step's ({"event": ...}: start-up times, data packing)."""
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def report(self, step: int, total: int, loss: float, lr: float, grad_norm: float | None) -> dict[str, float]:
        """Print one progress line for the steps since the last report and reset the window."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.window_start
        step_time = elapsed / max(self.window_steps, 1)
        tflops = self.flops_per_step / step_time / self.world / 1e12
        stats = {
            "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else 0.0,
            "mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        }
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "window_steps": self.window_steps, **stats}) + "\n")
            self.jsonl.flush()
        if self.writer:
            log.info(progress_line(step, total, loss, lr, grad_norm, stats, self.skipped, self.peak))
            if self.tb:
                for key, value in {"loss": loss, "lr": lr, **stats}.items():
                    self.tb.add_scalar(key, value, step)
        self.window_start = time.perf_counter()
        self.window_steps = 0
        return stats

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def progress_line(step: int, total: int, loss: float, lr: float, grad_norm: float | None, stats: dict[str, float],
                  skipped: int, peak_tflops: float) -> str:
    """The console line of one log interval (see the module doc for what it leaves out and why)."""
    norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
    parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {loss:.4f}", f"lr {lr:.3e}", f"grad norm {norm}"]
    if skipped:
        parts.append(f"skipped {skipped}")
    parts += [f"{stats['step_time_s'] * 1000:.0f} ms/step", f"{stats['tokens_per_s']:,.0f} tok/s"]
    if peak_tflops:
        parts += [f"{stats['tflops_per_gpu']:.1f} TFLOP/s/GPU", f"MFU {stats['mfu'] * 100:.1f}%"]
    if stats["mem_gib"]:
        parts.append(f"mem {stats['mem_gib']:.1f} GiB")
    return " | ".join(parts)


LAUNCH_TIME_ENV = "RECIPEC_LAUNCH_TIME"  # time.time() when `recipec launch` started the ranks
PHASES = ("imports", "process_group", "model", "optimizer", "data", "checkpoint_load", "first_step")


def process_start_time() -> float | None:
    """When this process started (time.time() scale), or None where psutil cannot say."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - an optional figure; the run goes on without it
        return None


class StartupTimer:
    """Seconds per set-up phase (see PHASES); a phase timed twice adds up."""

    def __init__(self, main_start: float) -> None:
        started = process_start_time()
        self.seconds = {name: 0.0 for name in PHASES}
        self.seconds["imports"] = max(0.0, main_start - started) if started is not None else 0.0
        self.main_start = main_start

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] += time.time() - start

    def first_step_done(self, seconds: float) -> tuple[str, dict[str, Any]]:
        """(the log line, the metrics.jsonl record) once the first step has completed."""
        self.seconds["first_step"] = seconds
        record: dict[str, Any] = {"event": "startup", **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}
        launch = os.environ.get(LAUNCH_TIME_ENV)
        try:
            launched = float(launch) if launch else None
        except ValueError:
            launched = None
        if launched is not None:
            record["launch_to_first_step_s"] = round(time.time() - launched, 3)
        return startup_line(record), record


def startup_line(record: dict[str, Any]) -> str:
    """`startup: imports 2.1 s, ..., first step 1.2 s; launch to first step 8.5 s` (the last part
    only when the launcher said when it started)."""
    line = "startup: " + ", ".join(f"{name.replace('_', ' ')} {record[name + '_s']:.1f} s" for name in PHASES)
    if "launch_to_first_step_s" in record:
        line += f"; launch to first step {record['launch_to_first_step_s']:.1f} s"
    return line
