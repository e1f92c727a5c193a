"""The training loop every mode shares: steps, logging, evaluation, checkpoints, stop signals.

It knows nothing of a batch: the training mode (runtime/modes/) gives this rank's microbatches
of a step and the forward step that turns one into a loss and its metrics; Megatron-Core's
pipeline schedule runs them. train.py builds what the loop is given (model, optimizer,
scheduler, the mode and its data, the resumed step).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from recipec.compiler.plan import Plan
from recipec.compiler.schema import RecipeConfig

log = logging.getLogger("recipec.runtime")


class DivergedError(RuntimeError):
    """Training produced non-finite gradients; nothing more is saved."""


@dataclass
class Trainer:
    """What the loop drives; train.py's set-up fills it."""

    config: RecipeConfig
    plan: Plan
    device: torch.device
    chunks: list[Any]  # DDP-wrapped model chunks (one per virtual pipeline stage)
    optimizer: Any
    scheduler: Any
    mode: Any  # runtime/modes/base.TrainingMode
    saver: Any  # checkpoint.Saver or None
    meter: Any  # metrics.Meter
    profiler: Any
    stop: Any  # train.StopSignal
    timer: Any  # metrics.StartupTimer
    step: int = 0


@contextlib.contextmanager
def manual_gc(interval: int) -> Iterator[None]:
    """Python's GC off inside the loop (collected every `interval` steps by the loop), restored
    however the loop ends; start-up objects are frozen so collections stay short."""
    if not interval:
        yield
        return
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def local_metrics(outputs: list[dict[str, torch.Tensor]], names: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """This rank's share of the step's mean of each metric (the first is the loss): summed over
    all ranks it is the global mean. Stays on the device; the host reads it only when the pending
    steps are flushed, so a step costs no extra host synchronization."""
    from megatron.core import parallel_state

    reporter = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0)
    if not (reporter and outputs):
        return torch.zeros(len(names), device=device)
    values = torch.stack([torch.stack([o[n].float().reshape(()) for n in names]) for o in outputs]).mean(dim=0)
    return values / parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def flush(pending: list[tuple[int, torch.Tensor, float, float | None, bool]], stop_flag: float,
          device: torch.device, width: int) -> tuple[list[list[float]], bool]:
    """One all-reduce for the metrics of the pending steps and the stop flag (MAX via the sum > 0)."""
    values = torch.cat([p[1] for p in pending] + [torch.tensor([stop_flag], device=device)])
    dist.all_reduce(values)
    host = values.tolist()
    return [host[i * width:(i + 1) * width] for i in range(len(pending))], host[-1] > 0


def full_iteration_graph(forward_backward: Any, c: RecipeConfig) -> Any:
    """Megatron-Core's full-iteration CUDA graph around the schedule: eager for the warm-up
    steps, then one capture, then one graph replay per step (forward + backward of every
    microbatch, grad sync included; the optimizer step stays eager)."""
    import inspect

    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    kwargs: dict[str, Any] = {"cuda_graph_warmup_steps": c.train.cuda_graph_warmup_steps}
    if "use_single_mempool" in inspect.signature(FullCudaGraphWrapper).parameters:
        kwargs["use_single_mempool"] = True
    return FullCudaGraphWrapper(forward_backward, **kwargs)


def cuda_graphs_captured(kind: str) -> bool:
    """Whether Megatron-Core has captured this kind's graphs (so the log can say so, not assume)."""
    if kind == "layers":
        from megatron.core.transformer.cuda_graphs import _CudagraphGlobalRecord

        return bool(_CudagraphGlobalRecord.cudagraph_created)
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    return FullCudaGraphWrapper.cuda_graph.get("training") is not None


def train(t: Trainer) -> None:
    """Run steps t.step + 1 .. train.train_iters (or until a stop signal), logging, evaluating and
    saving as the recipe says; the run ends with a complete checkpoint when one is configured."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    c, ck, mode, device = t.config, t.config.checkpoint, t.mode, t.device
    rank0 = dist.get_rank() == 0
    forward_backward = get_forward_backward_func()
    if c.train.cuda_graph == "full_iteration":
        forward_backward = full_iteration_graph(forward_backward, c)
    if c.train.cuda_graph != "none":
        log.info(f"CUDA graphs: {c.train.cuda_graph}, captured after {c.train.cuda_graph_warmup_steps} eager steps")
    model_arg = t.chunks if len(t.chunks) > 1 else t.chunks[0]
    common = {"forward_step_func": mode.forward_step, "model": model_arg,
                  "num_microbatches": t.plan.microbatches_per_step,
                  "seq_length": c.model.seq_length // c.parallel.context_parallel_size,
                  "micro_batch_size": c.train.micro_batch_size}
    step = t.step
    if rank0 and step >= c.train.train_iters:
        log.info(f"already trained to step {step} (train.train_iters={c.train.train_iters}); "
                 f"raise train.train_iters to continue this run")
    elif rank0 and step:
        log.info(f"continuing at step {step + 1} of {c.train.train_iters}")
    for record in mode.events():
        t.meter.event({**record, "step": step})
    last_saved = start_step = step
    names = tuple(mode.metrics)
    # Model, optimizer and Megatron state live for the whole run: keep them out of the cyclic
    # GC's generations, else each full collection walks them all (Llama-3.2-1B on one H100:
    # 208 -> 198 ms/step, bench/RESULTS.md). Unfrozen below, for callers that run() in-process.
    gc_interval = c.train.manual_gc_interval
    with manual_gc(gc_interval):
        pending: list[tuple[int, torch.Tensor, float, float | None, bool]] = []
        stopping = False
        while step < c.train.train_iters and not stopping:
            step_start = time.time()
            t.profiler.before_step(step)
            for chunk in t.chunks:
                chunk.zero_grad_buffer()
            t.optimizer.zero_grad()
            batches = mode.microbatches("train", step)
            data = [iter(batches) for _ in t.chunks] if len(t.chunks) > 1 else iter(batches)
            outputs = forward_backward(data_iterator=data, forward_only=False, **common)
            ok, grad_norm, _ = t.optimizer.step()
            t.scheduler.step(increment=1)
            step += 1
            norm = float(grad_norm) if grad_norm is not None else None
            if norm is not None and not math.isfinite(norm):  # the global norm: every rank stops here
                if t.saver is not None:
                    t.saver.finish()  # a checkpoint still being hashed predates the divergence: complete it
                raise DivergedError(f"gradient norm is {norm} at step {step}; stopping without saving, so the "
                                    f"last checkpoint ({last_saved or 'none'}) stays the last good one")
            pending.append((step, local_metrics(outputs, names, device), t.optimizer.param_groups[0]["lr"], norm, ok))
            if step == start_step + 1:
                _startup_report(t, step, step_start, rank0)
                if t.saver is not None and _periodic_save_ahead(step, ck.save_interval, c.train.train_iters):
                    t.saver.reserve_staging(t.chunks, t.optimizer, t.scheduler)  # off the first save's stall
            if c.train.cuda_graph != "none" and step == start_step + c.train.cuda_graph_warmup_steps + 2:
                captured = cuda_graphs_captured(c.train.cuda_graph)
                log.info(f"CUDA graphs ({c.train.cuda_graph}) {'captured and replaying' if captured else 'NOT captured: eager'}"
                         f" at step {step}")
            t.profiler.after_step(step)
            if t.saver is not None:
                t.saver.poll()  # a checkpoint being hashed completes as soon as every rank is done (no-op if none)
            if gc_interval and step % gc_interval == 0:
                gc.collect()
            due_save = bool(ck.save_interval and step % ck.save_interval == 0)
            due_eval = bool(c.train.eval_interval and step % c.train.eval_interval == 0)
            last = step == c.train.train_iters
            if not (step % c.logging.log_interval == 0 or last or due_save or due_eval):
                continue
            # Metrics reach the host here, once per log interval, together with the stop decision.
            received = 1.0 if (c.train.exit_signal_handler and t.stop.received) else 0.0
            values, stopping = flush(pending, received, device, len(names))
            for (s, _, lr, n, good), row in zip(pending, values):
                t.meter.record(s, row[0], lr, n, skipped=not good, extra=dict(zip(names[1:], row[1:])))
            _, _, lr, norm, _ = pending[-1]
            pending.clear()
            if step % c.logging.log_interval == 0 or last:
                t.meter.report(step, c.train.train_iters, values[-1][0], lr, norm)
            if due_eval:
                evaluate(t, step, common, forward_backward)
            if t.saver is not None:
                if (due_save or stopping or last) and step != last_saved:
                    # Returns once the data is written; hashing and the rename into place follow.
                    t.saver.save(step, t.chunks, t.optimizer, t.scheduler, final=last and not stopping)
                    last_saved = step
                if stopping or last:
                    t.saver.finish()  # waits for the hashes: the run ends with a complete checkpoint
            if stopping and rank0:
                log.info(f"stopping at step {step} on signal {t.stop.received or 'from another rank'}; "
                         f"{'checkpoint saved' if ck.save else 'no checkpoint.save configured'}")
    t.step = step


def _periodic_save_ahead(step: int, interval: int | None, train_iters: int) -> bool:
    """Whether a periodic save comes at or after `step` and before the last step (whose final save
    stages another format): only then is pinned staging memory worth reserving."""
    return bool(interval) and -(-step // interval) * interval < train_iters


def _startup_report(t: Trainer, step: int, step_start: float, rank0: bool) -> None:
    """The start-up line and record, once, after the first completed step (runtime/metrics.py)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize()  # once: the first step's time is the device's, not the launch queue's
    line, record = t.timer.first_step_done(time.time() - step_start)
    if rank0:
        log.info(line)
    t.meter.event({**record, "step": step})


def evaluate(t: Trainer, step: int, common: dict[str, Any], forward_backward: Any) -> None:
    """Mean loss over train.eval_iters validation batches, logged by rank 0."""
    c, names = t.config, tuple(t.mode.metrics)
    for chunk in t.chunks:
        chunk.eval()
    losses = []
    with torch.no_grad():
        for i in range(c.train.eval_iters):
            batches = t.mode.microbatches("valid", (step // (c.train.eval_interval or 1)) * c.train.eval_iters + i)
            data = [iter(batches) for _ in t.chunks] if len(t.chunks) > 1 else iter(batches)
            outputs = forward_backward(data_iterator=data, forward_only=True, **common)
            value = local_metrics(outputs, names, t.device)
            dist.all_reduce(value)
            losses.append(float(value[0].item()))
    for chunk in t.chunks:
        chunk.train()
    if dist.get_rank() == 0:
        mean = sum(losses) / len(losses)
        log.info(f"eval at step {step}: loss {mean:.4f} (over {len(losses)} batches)")
