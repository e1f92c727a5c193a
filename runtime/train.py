"""The per-rank training entry point: `python -m recipec.runtime.train --artifact BUILD_DIR`.

torchrun starts one of these per rank. It executes exactly the compiled
artifact: init dist -> model -> optimizer + DDP -> data -> loop -> logs and
dist checkpoints. SIGTERM/SIGUSR1 finish the current step, save, and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from recipec.compiler.errors import RecipeError
from recipec.compiler.schema import RecipeConfig

from .artifact import Artifact, load_artifact

log = logging.getLogger("recipec.runtime")


def _setup_logging() -> None:
    """Rank 0 speaks, library noise is filtered once, `recipec launch --verbose` shows it all (runtime/logs.py)."""
    from . import logs

    logs.setup(logs.env_rank())


class StopSignal:
    """Remembers SIGTERM/SIGUSR1/SIGINT so the loop can finish its step, save and exit cleanly.

    Installed when run() starts, so a signal that lands during start-up, resume or a save is
    remembered too (the loop then stops at its next flush, after a completed save). With
    train.exit_signal_handler=false nothing is installed: the signals keep their default action.
    Checkpoint writer processes forked during a save ignore these signals (ckpt_workers).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.received: int | None = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum


def _init_distributed(c: RecipeConfig, on_gpu: bool) -> torch.device:
    from .model import init_model_parallel

    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if c.train.cuda_graph != "none":
            # Capture must not depend on the legacy default stream; autograd nodes made before it
            # (DDP's grad-accumulator hooks) remember the stream current when they were created.
            torch.cuda.set_stream(torch.cuda.Stream())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=10))
    init_model_parallel(c)
    return device


def _optimizer(c: RecipeConfig, ddp_chunks: list[Any]) -> tuple[Any, Any]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from .model import _DTYPES, _supported

    o, s, prec = c.optimizer, c.scheduler, c.precision
    config = OptimizerConfig(**_supported(OptimizerConfig, dict(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad, use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_param_gather=o.overlap_param_gather and o.use_distributed_optimizer,
        bf16=prec.dtype == "bf16", fp16=prec.dtype == "fp16", params_dtype=_DTYPES[prec.dtype],
        initial_loss_scale=prec.initial_loss_scale, log_num_zeros_in_grad=False,
    )))
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    assert s.lr_warmup_iters is not None and s.lr_decay_iters is not None
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters, lr_decay_steps=s.lr_decay_iters, lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=c.train.train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=s.lr_wsd_decay_iters, lr_wsd_decay_style="linear" if s.lr_wsd_decay_iters else None,
    )
    return optimizer, scheduler


def _wire_grad_sync(ddp_chunks: list[Any]) -> None:
    """Let the pipeline schedule drive DDP: no grad sync inside accumulation, reduce at the end."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_chunks[0].module.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    if len(ddp_chunks) > 1 or ddp_chunks[0].ddp_config.overlap_grad_reduce:
        config.grad_sync_func = [c.start_grad_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].start_grad_sync
    if ddp_chunks[0].ddp_config.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].start_param_sync


def _forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


class DivergedError(RuntimeError):
    """Training produced non-finite gradients; nothing more is saved."""


@contextlib.contextmanager
def _manual_gc(interval: int) -> Iterator[None]:
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


def _local_loss(outputs: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """This rank's share of the step's mean loss: summed over all ranks it is the global mean.

    Stays on the device; the host reads it only when the pending steps are flushed, so a step
    costs no extra host synchronization.
    """
    from megatron.core import parallel_state

    reporter = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0)
    if not (reporter and outputs):
        return torch.zeros(1, device=device)
    loss = torch.stack([o["lm loss"].float() for o in outputs]).mean().reshape(1)
    return loss / parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def _flush(pending: list[tuple[int, torch.Tensor, float, float | None, bool]], stop_flag: float,
           device: torch.device) -> tuple[list[float], bool]:
    """One all-reduce for the losses of the pending steps and the stop flag (MAX via the sum > 0)."""
    values = torch.cat([p[1] for p in pending] + [torch.tensor([stop_flag], device=device)])
    dist.all_reduce(values)
    host = values.tolist()
    return host[:-1], host[-1] > 0


def _reduce_loss(outputs: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean loss over microbatches and data/context ranks, made known to every rank."""
    value = _local_loss(outputs, device)
    dist.all_reduce(value)
    return float(value.item())


def _full_iteration_graph(forward_backward: Any, c: RecipeConfig) -> Any:
    """Megatron-Core's full-iteration CUDA graph around the schedule: eager for the warm-up
    steps, then one capture, then one graph replay per step (forward + backward of every
    microbatch, grad sync included; the optimizer step stays eager)."""
    import inspect

    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    kwargs: dict[str, Any] = {"cuda_graph_warmup_steps": c.train.cuda_graph_warmup_steps}
    if "use_single_mempool" in inspect.signature(FullCudaGraphWrapper).parameters:
        kwargs["use_single_mempool"] = True
    return FullCudaGraphWrapper(forward_backward, **kwargs)


def _cuda_graphs_captured(mode: str) -> bool:
    """Whether Megatron-Core has captured this mode's graphs (so the log can say so, not assume)."""
    if mode == "layers":
        from megatron.core.transformer.cuda_graphs import _CudagraphGlobalRecord

        return bool(_CudagraphGlobalRecord.cudagraph_created)
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper

    return FullCudaGraphWrapper.cuda_graph.get("training") is not None


def run(artifact: Artifact) -> int:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from . import checkpoint as ckpt
    from .ckpt_compat import model_record
    from .ckpt_workers import install as children_die_with_this_rank
    from .data import build_datasets, step_microbatches
    from .device import activate_cpu_mode
    from .init import keyed_init
    from .metrics import Meter
    from .model import build_model_chunks, wrap_ddp
    from .profiling import Profiler
    from .run_lock import lock_run_directories
    from .tokenizer import build_tokenizer

    c, plan = artifact.config, artifact.plan
    stop = StopSignal(c.train.exit_signal_handler)
    children_die_with_this_rank()  # processes this rank forks (checkpoint writers, data workers) end with it
    from .layer_spec import uses_transformer_engine

    uses_transformer_engine(c.model.transformer_impl, c.train.torch_compile)  # a missing TE fails here, first
    on_gpu = torch.cuda.is_available() and c.launch.accelerator != "cpu"
    if c.train.cuda_graph != "none" and not on_gpu:
        raise RecipeError(f"train.cuda_graph={c.train.cuda_graph!r} needs a CUDA GPU, and this machine has none "
                          "(the recipe compiled for " + c.launch.accelerator + '); set train.cuda_graph="none"')
    if not on_gpu:
        activate_cpu_mode()
    device = _init_distributed(c, on_gpu)
    rank0 = dist.get_rank() == 0
    out_dir = Path(c.launch.output_dir.format(name=c.name))
    # One run owns its directories: a second run on them stops here (exit 2), before it reads or writes.
    run_lock = lock_run_directories([out_dir, c.checkpoint.save])
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    ck = c.checkpoint
    load_dir = ck.load or ck.save
    resumable = bool(load_dir) and ckpt.has_checkpoints(Path(load_dir))
    own = bool(ck.save) and resumable and Path(load_dir).resolve() == Path(ck.save).resolve()
    source = "checkpoint.save" if own else "checkpoint.load"
    record = model_record(c, plan["padded_vocab_size"])  # saved in every manifest, compared on resume
    if resumable:  # a checkpoint of another model stops the run here, by name, before anything is built
        ckpt.refuse_model_change(Path(load_dir), record, source)

    chunks, backend = build_model_chunks(c, plan["padded_vocab_size"], on_gpu=on_gpu)
    if not on_gpu:
        keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
    hf_pretrained = bool(ck.pretrained) and _is_hf_dir(ck.pretrained)
    if hf_pretrained and not ckpt.complete_steps(Path(ck.load or ck.save or ck.pretrained)):
        # An HF directory: its weights go straight into this rank's shards (any TP/PP), before
        # DDP and the optimizer copy them; a resumable checkpoint, if any, wins below.
        from .hf.convert import cpu_mode, load_hf_into_chunks

        if not on_gpu:
            cpu_mode()
        load_hf_into_chunks(ck.pretrained, chunks, c, plan["padded_vocab_size"])
        log.info(f"loaded Hugging Face weights from {ck.pretrained}")
    if ck.pretrained and not hf_pretrained and not resumable:
        # Base weights go into the bare model, before adapters, DDP and the optimizer's copies exist.
        loaded = ckpt.load_latest(Path(ck.pretrained), chunks, None, None, artifact.fingerprint,
                                  with_optimizer=False, require=True, model=record, source="checkpoint.pretrained")
        log.info(f"started from the weights of {ck.pretrained} (step {loaded} there)")
    if c.peft.method == "lora":
        from .lora import apply_lora, init_adapters, parameter_counts

        apply_lora(chunks, c)
        init_adapters(chunks, c.train.seed)
        trainable, total = parameter_counts(chunks)
        log.info(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%; "
                 f"rank {c.peft.lora_rank}, alpha {c.peft.lora_alpha:g}, targets {', '.join(c.peft.target_modules)})")
    if c.train.torch_compile:
        from .compile import compile_transformer_layers

        n = sum(compile_transformer_layers([chunk]) for chunk in chunks)
        log.info(f"torch.compile: {n} transformer layers compiled (inductor, per layer; identical layers share a graph)")
    log.info(f"recipec: {c.name} ({artifact.fingerprint[:19]}) on {dist.get_world_size()} rank(s), "
             f"{'cuda/nccl' if on_gpu else 'cpu/gloo (CPU mode: CUDA-only Megatron calls redirected)'}; "
             f"layer spec: {backend}" + ("" if backend == "transformer_engine"
                                          else " (Transformer Engine not importable: local modules + torch SDPA)"))
    ddp_chunks = wrap_ddp(c, chunks)
    _wire_grad_sync(ddp_chunks)
    optimizer, scheduler = _optimizer(c, ddp_chunks)
    tokenizer = build_tokenizer(c)
    train_data, valid_data = build_datasets(c, tokenizer, out_dir / "data")

    step = 0
    if resumable:
        # Failed checkpoints are renamed iter_N.bad only in this run's own (locked) directory. The
        # saved LR schedule continues unless scheduler.override_opt_param_scheduler (ckpt_state).
        step = ckpt.load_latest(Path(load_dir), ddp_chunks, optimizer, scheduler, artifact.fingerprint, mark_bad=own,
                                model=record, source=source,
                                override_schedule=c.scheduler.override_opt_param_scheduler)
    if step:
        scheduler.step(increment=0)
        scheduler.num_steps = step
        scheduler.step(increment=0)

    forward_backward = get_forward_backward_func()
    if c.train.cuda_graph == "full_iteration":
        forward_backward = _full_iteration_graph(forward_backward, c)
    if c.train.cuda_graph != "none":
        log.info(f"CUDA graphs: {c.train.cuda_graph}, captured after {c.train.cuda_graph_warmup_steps} eager steps")
    saver = ckpt.Saver(Path(ck.save), artifact.fingerprint, ck.keep_last, ck.optimizer_sharding, device,
                       model=record) if ck.save else None
    meter = Meter(plan, out_dir, dist.get_world_size(), c.logging.tensorboard_dir, writer=rank0)
    profiler = Profiler(c.profiling, dist.get_rank(), out_dir, on_gpu)
    model_arg = ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0]
    common = dict(forward_step_func=_forward_step, model=model_arg, num_microbatches=plan["microbatches_per_step"],
                  seq_length=c.model.seq_length // c.parallel.context_parallel_size,
                  micro_batch_size=c.train.micro_batch_size)
    if rank0 and step >= c.train.train_iters:
        log.info(f"already trained to step {step} (train.train_iters={c.train.train_iters}); "
                 f"raise train.train_iters to continue this run")
    elif rank0 and step:
        log.info(f"continuing at step {step + 1} of {c.train.train_iters}")
    last_saved = start_step = step
    # Model, optimizer and Megatron state live for the whole run: keep them out of the cyclic
    # GC's generations, else each full collection walks them all (Llama-3.2-1B on one H100:
    # 208 -> 198 ms/step, bench/RESULTS.md). Unfrozen below, for callers that run() in-process.
    gc_interval = c.train.manual_gc_interval
    with _manual_gc(gc_interval):
        pending: list[tuple[int, torch.Tensor, float, float | None, bool]] = []
        stopping = False
        while step < c.train.train_iters and not stopping:
            profiler.before_step(step)
            for chunk in ddp_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            batches = step_microbatches(train_data, step, c, device)
            data = [iter(batches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(batches)
            outputs = forward_backward(data_iterator=data, forward_only=False, **common)
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            step += 1
            norm = float(grad_norm) if grad_norm is not None else None
            if norm is not None and not math.isfinite(norm):  # the global norm: every rank stops here
                if saver is not None:
                    saver.finish()  # a checkpoint still being hashed predates the divergence: complete it
                raise DivergedError(f"gradient norm is {norm} at step {step}; stopping without saving, so the "
                                    f"last checkpoint ({last_saved or 'none'}) stays the last good one")
            pending.append((step, _local_loss(outputs, device), optimizer.param_groups[0]["lr"], norm, ok))
            if c.train.cuda_graph != "none" and step == start_step + c.train.cuda_graph_warmup_steps + 2:
                captured = _cuda_graphs_captured(c.train.cuda_graph)
                log.info(f"CUDA graphs ({c.train.cuda_graph}) {'captured and replaying' if captured else 'NOT captured: eager'}"
                         f" at step {step}")
            profiler.after_step(step)
            if saver is not None:
                saver.poll()  # a checkpoint being hashed completes as soon as every rank is done (no-op if none)
            if gc_interval and step % gc_interval == 0:
                gc.collect()
            due_save = bool(ck.save_interval and step % ck.save_interval == 0)
            due_eval = bool(c.train.eval_interval and step % c.train.eval_interval == 0)
            last = step == c.train.train_iters
            if not (step % c.logging.log_interval == 0 or last or due_save or due_eval):
                continue
            # Losses reach the host here, once per log interval, together with the stop decision.
            received = 1.0 if (c.train.exit_signal_handler and stop.received) else 0.0
            losses, stopping = _flush(pending, received, device)
            for (s, _, lr, n, good), loss in zip(pending, losses):
                meter.record(s, loss, lr, n, skipped=not good)
            _, _, lr, norm, _ = pending[-1]
            pending.clear()
            if step % c.logging.log_interval == 0 or last:
                meter.report(step, c.train.train_iters, losses[-1], lr, norm)
            if due_eval:
                _evaluate(c, ddp_chunks, valid_data, step, device, common, forward_backward)
            if saver is not None:
                if (due_save or stopping or last) and step != last_saved:
                    # Returns once the data is written; hashing and the rename into place follow.
                    saver.save(step, ddp_chunks, optimizer, scheduler)
                    last_saved = step
                if stopping or last:
                    saver.finish()  # waits for the hashes: the run ends with a complete checkpoint
            if stopping and rank0:
                log.info(f"stopping at step {step} on signal {stop.received or 'from another rank'}; "
                         f"{'checkpoint saved' if ck.save else 'no checkpoint.save configured'}")
    if saver is not None:
        saver.finish()
    meter.close()
    profiler.close()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if run_lock is not None:
        run_lock.release()
    return 0


def _evaluate(c: RecipeConfig, ddp_chunks: list[Any], valid_data: Any, step: int, device: torch.device,
              common: dict[str, Any], forward_backward: Any) -> None:
    from .data import step_microbatches

    for chunk in ddp_chunks:
        chunk.eval()
    losses = []
    with torch.no_grad():
        for i in range(c.train.eval_iters):
            batches = step_microbatches(valid_data, (step // (c.train.eval_interval or 1)) * c.train.eval_iters + i,
                                        c, device)
            data = [iter(batches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(batches)
            outputs = forward_backward(data_iterator=data, forward_only=True, **common)
            losses.append(_reduce_loss(outputs, device))
    for chunk in ddp_chunks:
        chunk.train()
    if dist.get_rank() == 0:
        mean = sum(losses) / len(losses)
        log.info(f"eval at step {step}: loss {mean:.4f} (over {len(losses)} batches)")


def _is_hf_dir(path: str) -> bool:
    """checkpoint.pretrained names a Hugging Face directory (config.json + safetensors)."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    """One rank's run. The runtime's exit-2 boundary (runtime/boundary.py): a user's or a file's
    mistake is one `recipec: error:` message and exit 2, a bug keeps its traceback."""
    from . import boundary

    _setup_logging()  # first: the filters must be in place before a library is imported and warns
    from .safe_load import install

    install()  # weights-only torch.load and data-only DCP metadata, before anything is read
    parser = argparse.ArgumentParser(prog="python -m recipec.runtime.train", description=__doc__)
    parser.add_argument("--artifact", required=True, help="build directory (or its plan.json) from `recipec build`")
    args = parser.parse_args(argv)
    missing = boundary.missing_launcher_env()

    def body() -> int:
        artifact = load_artifact(args.artifact)
        try:
            return run(artifact)
        except ValueError as exc:
            # torch's env:// rendezvous: "environment variable RANK expected, but not set". Checked
            # here, not up front, so the artifact's own errors (checked first in run) still show.
            if missing and "expected, but not set" in str(exc):
                raise boundary.not_launched(missing, args.artifact) from None
            raise
        except DivergedError as exc:
            print(f"recipec: error: training diverged: {exc}", file=sys.stderr)
            return 1

    code = boundary.guarded(body)
    if code:
        boundary.release_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
