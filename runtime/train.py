"""The per-rank training entry point: `python -m recipec.runtime.train --artifact BUILD_DIR`.

torchrun starts one of these per rank. It executes exactly the compiled
artifact: init dist -> model (weights, LoRA, DDP) -> optimizer -> the training mode's
data -> resume -> the shared loop (runtime/loop.py) -> logs and dist checkpoints. What is
trained and how the loss is formed is the mode's (`train.mode`, runtime/modes/); this file
and the loop hold nothing mode-specific. SIGTERM/SIGUSR1 finish the current step, save,
and exit 0. Each set-up phase is timed (metrics.StartupTimer) and reported after the first step.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from recipec.compiler.errors import RecipeError
from recipec.compiler.schema import RecipeConfig

from .artifact import Artifact, load_artifact
from .loop import DivergedError

__all__ = ["DivergedError", "StopSignal", "main", "run"]

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
    kwargs: dict[str, Any] = {
        "optimizer": o.optimizer, "lr": o.lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps, "sgd_momentum": o.sgd_momentum,
        "clip_grad": o.clip_grad, "use_distributed_optimizer": o.use_distributed_optimizer,
        "overlap_param_gather": o.overlap_param_gather and o.use_distributed_optimizer,
        "bf16": prec.dtype == "bf16", "fp16": prec.dtype == "fp16", "params_dtype": _DTYPES[prec.dtype],
        "initial_loss_scale": prec.initial_loss_scale, "log_num_zeros_in_grad": False,
        # As Megatron-LM passes --fp8-recipe: the distributed optimizer handles FP8 params and the
        # precision-aware optimizer's master weights by recipe (delayed differs from the others).
        "fp8_recipe": prec.fp8,
    }
    if o.use_precision_aware_optimizer:
        # What the compiler cannot check: a CUDA device, TE's FusedAdam with the low-precision
        # arguments, and a Megatron-Core with the fields (_supported would drop them: an fp32 run).
        import dataclasses
        import inspect

        from recipec.compiler.errors import Problem

        def refuse(message: str, hint: str) -> RecipeError:
            return RecipeError([Problem(RecipeError, message, key="optimizer.use_precision_aware_optimizer",
                                        hint=hint)])

        off = "set optimizer.use_precision_aware_optimizer=false"
        if not torch.cuda.is_available() or c.launch.accelerator == "cpu":
            raise refuse("the precision-aware optimizer needs Transformer Engine's FusedAdam on a CUDA GPU, and "
                         "this run has none", off)
        try:
            from transformer_engine.pytorch.optimizers import FusedAdam
        except ImportError as exc:
            raise refuse("the precision-aware optimizer needs Transformer Engine's FusedAdam, which does not "
                         f"import here ({type(exc).__name__}: {exc})",
                         f"install Transformer Engine (recipec[te]), or {off}") from None
        keys = ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")
        lacking = [a for a in ("exp_avg_dtype", "exp_avg_sq_dtype", "master_weight_dtype", "use_decoupled_grad")
                   if a not in inspect.signature(FusedAdam).parameters]
        lacking += sorted({"use_precision_aware_optimizer", *keys} - {f.name for f in dataclasses.fields(OptimizerConfig)})
        if lacking:
            raise refuse(f"this Transformer Engine / Megatron-Core lacks {lacking}", f"upgrade them, or {off}")
        # Megatron-LM's --exp-avg-dtype etc. spellings; fp8 moments are TE's scaled uint8.
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}
        kwargs.update(use_precision_aware_optimizer=True, **{k: dtypes[getattr(o, k)] for k in keys})
    config = OptimizerConfig(**_supported(OptimizerConfig, kwargs))
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


def run(artifact: Artifact, main_start: float | None = None) -> int:
    """One rank's whole run: set-up (timed per phase), the shared loop, and an orderly end."""
    from megatron.core import parallel_state

    from . import checkpoint as ckpt
    from .ckpt_compat import model_record
    from .ckpt_workers import install as children_die_with_this_rank
    from .device import activate_cpu_mode
    from .loop import Trainer, train
    from .metrics import Meter, StartupTimer
    from .modes import build_mode
    from .modes.base import Context
    from .profiling import Profiler
    from .run_lock import lock_run_directories

    timer = StartupTimer(main_start if main_start is not None else time.time())
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
    started = int(os.environ.get("WORLD_SIZE", plan.world_size))
    if started != plan.world_size:  # the batch split (plan.data_parallel_size, microbatches) assumes it
        raise RecipeError(f"{artifact.directory} was compiled for {plan.world_size} rank(s) (launch.nodes x "
                          f"launch.gpus_per_node), but torchrun started {started}; run it with `recipec launch`, or "
                          f"rebuild with the layout you start")
    with timer.phase("process_group"):
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
    record = model_record(c, plan.padded_vocab_size)  # saved in every manifest, compared on resume
    if resumable:  # a checkpoint of another model stops the run here, by name, before anything is built
        ckpt.refuse_model_change(Path(load_dir), record, source)

    mode = build_mode(Context(config=c, plan=plan, device=device, on_gpu=on_gpu, out_dir=out_dir))
    with timer.phase("model"):
        ddp_chunks = _build_model(artifact, on_gpu, resumable, record, timer)
        mode.build_extra_models(ddp_chunks)
    with timer.phase("optimizer"):
        optimizer, scheduler = _optimizer(c, ddp_chunks)
    with timer.phase("data"):
        mode.build_data()

    step = 0
    with timer.phase("checkpoint_load"):
        if resumable:
            # Failed checkpoints are renamed iter_N.bad only in this run's own (locked) directory. The
            # saved LR schedule continues unless scheduler.override_opt_param_scheduler (ckpt_state).
            step = ckpt.load_latest(Path(load_dir), ddp_chunks, optimizer, scheduler, artifact.fingerprint,
                                    mark_bad=own, model=record, source=source,
                                    override_schedule=c.scheduler.override_opt_param_scheduler)
    if step:
        scheduler.step(increment=0)
        scheduler.num_steps = step
        scheduler.step(increment=0)

    saver = ckpt.Saver(Path(ck.save), artifact.fingerprint, ck.keep_last, ck.optimizer_sharding, device,
                       model=record, async_save=bool(ck.async_save)) if ck.save else None
    meter = Meter(plan, out_dir, dist.get_world_size(), c.logging.tensorboard_dir, writer=rank0)
    profiler = Profiler(c.profiling, dist.get_rank(), out_dir, on_gpu)
    train(Trainer(config=c, plan=plan, device=device, chunks=ddp_chunks, optimizer=optimizer, scheduler=scheduler,
                  mode=mode, saver=saver, meter=meter, profiler=profiler, stop=stop, timer=timer, step=step))
    if saver is not None:
        saver.close()  # the last checkpoint complete, pruned ones deleted
    meter.close()
    profiler.close()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if run_lock is not None:
        run_lock.release()
    return 0


def _build_model(artifact: Artifact, on_gpu: bool, resumable: bool, record: dict[str, Any], timer: Any) -> list[Any]:
    """This rank's model chunks with their start weights (HF or dist checkpoint, timed as checkpoint
    load), LoRA adapters and torch.compile applied, wrapped in Megatron-Core DDP."""
    from . import checkpoint as ckpt
    from .hf.reader import is_hf_dir
    from .init import keyed_init
    from .model import build_model_chunks, wrap_ddp

    c, plan, ck = artifact.config, artifact.plan, artifact.config.checkpoint
    chunks, backend = build_model_chunks(c, plan.padded_vocab_size, on_gpu=on_gpu)
    if not on_gpu:
        keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
    hf_pretrained = bool(ck.pretrained) and is_hf_dir(ck.pretrained)
    if hf_pretrained and not ckpt.complete_steps(Path(ck.load or ck.save or ck.pretrained)):
        # An HF directory: its weights go straight into this rank's shards (any TP/PP), before
        # DDP and the optimizer copy them; a resumable checkpoint, if any, wins later.
        from .hf.convert import cpu_mode, load_hf_into_chunks

        if not on_gpu:
            cpu_mode()
        with timer.phase("checkpoint_load"):
            load_hf_into_chunks(ck.pretrained, chunks, c, plan.padded_vocab_size)
        log.info(f"loaded Hugging Face weights from {ck.pretrained}")
    if ck.pretrained and not hf_pretrained and not resumable:
        # Base weights go into the bare model, before adapters, DDP and the optimizer's copies exist.
        with timer.phase("checkpoint_load"):
            loaded = ckpt.load_latest(Path(ck.pretrained), chunks, None, None, artifact.fingerprint,
                                      with_optimizer=False, require=True, model=record,
                                      source="checkpoint.pretrained")
        log.info(f"started from the weights of {ck.pretrained} (step {loaded} there)")
    if c.peft.method in ("lora", "dora"):  # runtime/lora.py: DoRA is LoRA plus a magnitude vector
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
                                          else " (Transformer Engine not importable: local modules + torch SDPA)")
             + f"; train.mode: {c.train.mode}" + (" (packed sequences)" if c.data.packing else ""))
    ddp_chunks = wrap_ddp(c, chunks)
    _wire_grad_sync(ddp_chunks)
    return ddp_chunks


def main(argv: list[str] | None = None) -> int:
    """One rank's run. The runtime's exit-2 boundary (runtime/boundary.py): a user's or a file's
    mistake is one `recipec: error:` message and exit 2, a bug keeps its traceback."""
    from . import boundary

    main_start = time.time()  # imports before this are timed from the process start (metrics.StartupTimer)
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
            return run(artifact, main_start)
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
