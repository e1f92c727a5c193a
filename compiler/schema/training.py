"""[train], [optimizer], [scheduler], [precision]: what one step does and how often."""

import attrs

from ..modes import DERIVED_RULE, MODES
from ._fields import option
from .bounds import (
    MAX_BATCH,
    MAX_FACTOR,
    MAX_LOSS_SCALE,
    MAX_RATE,
    MAX_SEED,
    MAX_SMALL,
    MAX_STEPS,
    MAX_TOKENS,
)


@attrs.frozen
class TrainConfig:
    """Training mode, batch sizes, length of the run, evaluation and seed."""

    mode: str | None = option(
        None, "What is trained and how the loss is formed: pretrain (every token) or sft (the responses of "
        "jsonl records); a plug-in each (compiler/modes, runtime/modes).", choices=tuple(MODES),
        derived=DERIVED_RULE)
    mode_options: dict[str, str | int | float | bool] = option(
        {}, "The training mode's own keys (e.g. a DPO beta), checked by the mode's plug-in "
        "(compiler/modes/<mode>.py); pretrain and sft have none.")
    global_batch_size: int = option(256, "Sequences per optimizer step, all ranks together.", min=1, max=MAX_BATCH)
    micro_batch_size: int = option(1, "Sequences per forward pass on one rank.", min=1, max=MAX_BATCH)
    train_iters: int = option(1000, "Optimizer steps to run.", min=1, max=MAX_STEPS)
    eval_interval: int | None = option(None, "Evaluate every N steps; unset for never.", min=1, max=MAX_STEPS)
    eval_iters: int = option(10, "Batches per evaluation.", min=1, max=MAX_STEPS)
    seed: int = option(1234, "Random seed (init, data order, dropout).", min=0, max=MAX_SEED)
    torch_compile: bool = option(
        False, "torch.compile each transformer layer (inductor); needs model.transformer_impl local or auto, "
        "where auto then picks the local modules."
    )
    cuda_graph: str = option(
        "none", "Replay CUDA graphs instead of launching kernels one by one: `layers` captures each "
        "transformer layer's forward and backward (Megatron-Core's local graphs), `full_iteration` the "
        "whole forward-backward of a step (not the optimizer). GPU only.",
        choices=("none", "layers", "full_iteration"),
    )
    cuda_graph_warmup_steps: int = option(
        3, "Eager steps before the CUDA graphs are captured.", min=1, max=MAX_STEPS)
    exit_signal_handler: bool = option(
        True, "On SIGTERM/SIGUSR1 save a checkpoint at the next log step and exit 0."
    )
    manual_gc_interval: int = option(
        100, "Run Python's garbage collector only every N steps (0: automatic GC, which stalls steps).",
        min=0, max=MAX_STEPS)
    check_for_nan_in_grad: bool = option(
        False, "DDP also checks every gradient bucket for NaN/Inf (device syncs: ~10 ms/step at 1B on an "
        "H100); the runtime always stops, without saving, on a non-finite gradient norm."
    )


@attrs.frozen
class OptimizerConfig:
    """Megatron-Core optimizer: Adam(W) or SGD, distributed or not."""

    optimizer: str = option("adam", "Algorithm (adam is AdamW).", choices=("adam", "sgd"))
    lr: float = option(3e-4, "Peak learning rate.", min=0.0, max=MAX_RATE)
    min_lr: float = option(3e-5, "Learning rate at the end of decay.", min=0.0, max=MAX_RATE)
    weight_decay: float = option(0.1, "Decoupled weight decay.", min=0.0, max=MAX_RATE)
    adam_beta1: float = option(0.9, "Adam beta1.", min=0.0, max=1.0)
    adam_beta2: float = option(0.95, "Adam beta2.", min=0.0, max=1.0)
    adam_eps: float = option(1e-8, "Adam epsilon.", min=0.0, max=MAX_SMALL)
    sgd_momentum: float = option(0.9, "SGD momentum.", min=0.0, max=1.0)
    clip_grad: float = option(1.0, "Clip the global grad norm to this; 0 disables.", min=0.0, max=MAX_FACTOR)
    use_distributed_optimizer: bool = option(
        True, "Shard optimizer states over data-parallel ranks (ZeRO-1)."
    )
    overlap_grad_reduce: bool = option(False, "Overlap the grad reduce-scatter with backward.")
    overlap_param_gather: bool = option(
        False, "Overlap the param all-gather with the next forward (distributed optimizer)."
    )
    # Megatron-Core's precision-aware optimizer (OptimizerConfig fields of the same names, the
    # choices of Megatron-LM's --exp-avg-dtype etc.): Transformer Engine's FusedAdam keeps the Adam
    # moments (and optionally master weights, grads) in lower precision, e.g. bf16 moments take
    # 4 bytes/parameter instead of 8 and halve the optimizer's memory traffic.
    use_precision_aware_optimizer: bool = option(
        False, "Let the optimizer keep master params, grads and Adam moments in the dtypes below (Transformer "
        "Engine's FusedAdam; needs adam, the distributed optimizer and TE modules on a GPU).")
    main_grads_dtype: str = option(
        "fp32", "Main-grad dtype with use_precision_aware_optimizer (bf16 needs "
        "precision.grad_reduce_in_fp32=false).", choices=("fp32", "bf16"))
    main_params_dtype: str = option(
        "fp32", "Master-weight dtype with use_precision_aware_optimizer.", choices=("fp32", "fp16"))
    exp_avg_dtype: str = option(
        "fp32", "Adam first-moment dtype with use_precision_aware_optimizer (storage only; the update "
        "computes in fp32).", choices=("fp32", "fp16", "bf16", "fp8"))
    exp_avg_sq_dtype: str = option(
        "fp32", "Adam second-moment dtype with use_precision_aware_optimizer (storage only).",
        choices=("fp32", "fp16", "bf16", "fp8"))


@attrs.frozen
class SchedulerConfig:
    """Learning-rate warmup and decay (Megatron's OptimizerParamScheduler)."""

    lr_warmup_iters: int | None = option(
        None, "Linear warmup steps.", min=0, derived="lr_warmup_fraction x lr_decay_iters, else 0", max=MAX_STEPS)
    lr_warmup_fraction: float | None = option(
        None, "Warmup as a fraction of lr_decay_iters (Megatron's --lr-warmup-fraction).", min=0.0, max=1.0
    )
    lr_warmup_init: float = option(0.0, "Learning rate at step 0 of warmup.", min=0.0, max=MAX_RATE)
    lr_decay_style: str = option(
        "cosine", "Decay after warmup.",
        choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    )
    lr_decay_iters: int | None = option(
        None, "Step at which decay reaches min_lr (a resumed run keeps the saved one, see "
        "override_opt_param_scheduler).", min=1, derived="train.train_iters", max=MAX_STEPS)
    lr_wsd_decay_iters: int | None = option(
        None, "Final annealing steps of WSD.", min=1, max=MAX_STEPS)
    # The schedule is part of a run, as in Megatron-LM: raising train.train_iters to extend a finished
    # run must not re-derive lr_decay_iters and send the LR back up (runtime/ckpt_state.py).
    override_opt_param_scheduler: bool = option(
        False, "On resume, switch to this recipe's schedule (lr, min_lr, warmup, decay steps and style, "
        "weight decay) from the saved step on; off, a resumed run continues the schedule saved in its "
        "checkpoint (Megatron's --override-opt_param-scheduler).")


@attrs.frozen
class PrecisionConfig:
    """Compute dtype, FP8 recipe and the dtypes of grads and master weights."""

    dtype: str = option("bf16", "Mixed-precision compute dtype.", choices=("bf16", "fp16", "fp32"))
    fp8: str | None = option(
        None, "FP8 recipe (needs Transformer Engine); unset for none.",
        choices=("delayed", "tensorwise", "blockwise", "mxfp8"),
    )
    fp8_format: str = option("hybrid", "E4M3 forward/E5M2 backward, or E4M3 both.", choices=("hybrid", "e4m3"))
    fp8_amax_history_len: int = option(1024, "Amax history of the delayed recipe.", min=1, max=MAX_TOKENS)
    fp8_amax_compute_algo: str = option("max", "Amax reduction of the delayed recipe.", choices=("max", "most_recent"))
    fp8_param_gather: bool = option(False, "Keep params in FP8 and all-gather them in FP8.")
    grad_reduce_in_fp32: bool = option(True, "Accumulate and reduce gradients in fp32.")
    initial_loss_scale: float = option(65536.0, "Starting dynamic loss scale (fp16 only).", min=1.0, max=MAX_LOSS_SCALE)

    @property
    def param_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2
