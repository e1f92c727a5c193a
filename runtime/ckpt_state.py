"""The sharded state a recipec checkpoint holds: model chunks, optimizer, scheduler, RNG streams.

One function builds it for both directions (`loading=True` asks the optimizer for the load-side
sharding), so save and resume can never disagree about what a checkpoint contains.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject


def layout() -> dict[str, int]:
    """This run's parallel layout, recorded in the manifest and compared on resume."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


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
