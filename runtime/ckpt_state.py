"""The sharded state a recipec checkpoint holds: model chunks, optimizer, scheduler, RNG streams.

One function builds it for both directions (`loading=True` asks the optimizer for the load-side
sharding), so save and resume can never disagree about what a checkpoint contains.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistSaveShardedStrategy,
)

from .optimizer_gather import install as single_rank_gather


def layout() -> dict[str, int]:
    """This run's parallel layout, recorded in the manifest and compared on resume."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def writer_count() -> int:
    """Files (and writer processes) per rank and save: up to 8, as many as this rank's share of the
    node's CPUs allows. Megatron-Core 0.19 writes one file per rank by default (0.16: two); one
    writer and one hashing thread reached 0.7-0.8 GB/s of a disk that takes 1.4 GB/s (H200, session
    6), and the files are hashed in parallel (ckpt_manifest.hash_files), one thread per file."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, ranks_here)))


def save_strategy() -> Any:
    """Megatron's torch_dist save strategy, spread over the data-parallel ranks (as Megatron-LM's
    --ckpt-fully-parallel-save): each DP rank writes its share of the DP-replicated tensors
    instead of DP rank 0 writing them all. Any layout loads the result (the format is the same)."""
    base = TorchDistSaveShardedStrategy(backend="torch_dist", version=1, thread_count=writer_count())
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, parallel_state.get_data_parallel_group(with_context_parallel=True))


class ParallelLoad(FullyParallelLoadStrategyWrapper):
    """Megatron's fully parallel load, remembering how many tensor bytes each DP rank reads.

    Megatron plans the reads deterministically on every rank (one metadata all-gather), so the
    plan alone tells every rank everyone's share: `shares` needs no extra collective, which
    matters because a collective outside the load could hang beside a rank whose load failed."""

    shares: list[int] | None = None

    def apply_loading_parallelization(self, sharded_state_dict: Any) -> Any:
        plan = super().apply_loading_parallelization(sharded_state_dict)
        if plan is not None:
            shares = [0] * dist.get_world_size(self.parallelization_group)
            for shard, rank in plan.main_rank_for_shard.items():
                meta = plan.shard_to_metadata[shard]
                shares[rank] += math.prod(meta.local_shape) * meta.dtype.itemsize
            self.shares = shares
        return plan


def load_strategy(directory: str) -> ParallelLoad | None:
    """Megatron's torch_dist load strategy spread over the data-parallel ranks (as Megatron-LM's
    --ckpt-fully-parallel-load), None (Megatron's default) without data parallelism.

    Each DP rank (context parallel included: those ranks hold the same replicated tensors too)
    reads its share of the tensors and the ranks exchange the rest. The exchange is Megatron's
    "broadcast" on GPUs (NCCL, CUDA tensors); on CPU it is "gather_object" (one all_gather_object
    of the loaded tensors over gloo): "broadcast" and "gather_rounds" call `Tensor.cuda()` on the
    loaded tensors, which CPU mode does not redirect, so the reading rank raised while the others
    waited in the broadcast for it, and the resume hung (device.py redirects factories and
    torch.cuda.*, not tensor methods)."""
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    on_gpu = torch.cuda.is_available()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    base = _failing_together(get_default_load_sharded_strategy(directory), group, device)
    return ParallelLoad(base, group, exchange_algo="broadcast" if on_gpu else "gather_object")


class PeerLoadError(RuntimeError):
    """Raised on the ranks whose own share loaded when another rank's share did not."""


def _failing_together(strategy: Any, group: Any, device: torch.device) -> Any:
    """`strategy` with a load() that fails on every rank of `group` when it fails on one.

    In a fully parallel load each rank reads its share, then all exchange what they read. Megatron-
    Core 0.16's read went through torch DCP's collective load, so a rank's read error was every
    rank's; 0.19 reads with `no_dist=True`, so the rank whose file was damaged raised while the
    others went on into the exchange and waited for it forever (a DP=2 resume of a checkpoint with
    one broken file hung). One all-reduce of a flag after each read restores the agreement."""
    read = strategy.load

    def load(*args: Any, **kwargs: Any) -> Any:
        error: BaseException | None = None
        try:
            result = read(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - torch DCP's CheckpointException is a BaseException
            error = exc
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if failed.item():
            raise PeerLoadError("another data-parallel rank could not read its share of the checkpoint")
        return result

    strategy.load = load
    return strategy


def _rng_state() -> ShardedObject:
    """This rank's RNG streams, sharded by (pp, tp) and replicated over DP (as Megatron-LM does)."""
    state = {
        "random": torch.random.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state", state, (parallel_state.get_pipeline_model_parallel_world_size(),
                             parallel_state.get_tensor_model_parallel_world_size()),
        (pp, tp), replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def sharded_state(chunks: list[Any], optimizer: Any, scheduler: Any, *, loading: bool, with_optimizer: bool,
                  with_rng: bool, sharding: str) -> dict[str, Any]:
    # The unwrapped modules: DDP's state-dict keys carry a "module." prefix the model does not.
    chunks = [getattr(chunk, "module", chunk) for chunk in chunks]
    if len(chunks) == 1:
        model_sd = chunks[0].sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd}
    else:
        model_sd = {}
        state = {}
        for i, chunk in enumerate(chunks):
            sd = chunk.sharded_state_dict()
            state[f"model{i}"] = sd
            model_sd.update(sd)
    if with_optimizer:
        if not loading and sharding == "fully_reshardable":
            single_rank_gather()  # no gather on one data-parallel rank (runtime/optimizer_gather.py)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": sharding})
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def restore_rng(rng: dict[str, Any]) -> None:
    torch.random.set_rng_state(rng["random"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd")
_OVERRIDE = "scheduler.override_opt_param_scheduler"


def _schedule(sd: dict[str, Any], wd: bool) -> str:
    warmup = sd["lr_warmup_steps"]
    text = (f"{warmup} warmup step{'' if warmup == 1 else 's'}, {sd['lr_decay_style']} {sd['max_lr']:g} -> "
            f"{sd['min_lr']:g} by step {sd['lr_decay_steps']}")
    return text + (f", weight decay {sd['start_wd']:g}" if wd else "")


def restore_schedule(scheduler: Any, saved: dict[str, Any], *, override: bool) -> str:
    """Put the saved LR schedule back into `scheduler` (or keep this recipe's); the line for the log.

    Why the saved one by default: the schedule is part of the run, as in Megatron-LM (its
    `use_checkpoint_opt_param_scheduler`). A finished run extended by raising train.train_iters
    otherwise re-derives lr_decay_iters from the new train_iters and the LR jumps back up (3e-4
    to 1.65e-3 on the tiny recipe). So a resumed run keeps the saved max/min LR, warmup, decay
    steps and style (and weight decay) and continues from the saved step: past the saved decay
    the LR stays at min_lr. `scheduler.override_opt_param_scheduler = true` (Megatron's
    `override_opt_param_scheduler`) is how a user asks for this recipe's schedule instead, from
    the saved step on. The warmup's start LR and WSD's decay length are not in Megatron's saved
    state and always come from the recipe.
    """
    recipe = {k: v for k, v in scheduler.state_dict().items() if k in _SCHEDULE_KEYS}
    scheduler.override_opt_param_scheduler = override
    scheduler.use_checkpoint_opt_param_scheduler = not override
    scheduler.num_steps = 0  # load_state_dict advances by the saved count
    scheduler.load_state_dict(saved)
    stored = {k: saved.get(k, recipe[k]) for k in _SCHEDULE_KEYS}
    step = int(saved.get("num_steps", 0))
    wd = (stored["start_wd"], stored["end_wd"]) != (recipe["start_wd"], recipe["end_wd"])
    if override:
        replaced = "" if stored == recipe else f", replacing the saved one ({_schedule(stored, wd)})"
        return (f"LR schedule: this recipe's, as {_OVERRIDE}=true asks ({_schedule(recipe, wd)}){replaced}, "
                f"from step {step + 1}")
    ignored = "" if stored == recipe else f", not this recipe's ({_schedule(recipe, wd)})"
    ended = f"; it ended at step {stored['lr_decay_steps']}, so the LR stays at min_lr" \
        if step >= stored["lr_decay_steps"] and stored["lr_decay_style"] != "constant" else ""
    return (f"LR schedule: continuing the saved one ({_schedule(stored, wd)}){ignored}{ended}; {_OVERRIDE}=true "
            f"switches to this recipe's from step {step + 1}")
