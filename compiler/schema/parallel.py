"""[parallel]: how the model is split across GPUs (Megatron-Core names)."""

import attrs

from ._fields import option
from .bounds import MAX_LAYERS, MAX_RANKS


@attrs.frozen
class ParallelConfig:
    """Tensor, pipeline, context, expert and data parallelism; DP is what is left."""

    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks (TP).", min=1, max=MAX_RANKS)
    pipeline_model_parallel_size: int = option(1, "Pipeline stages (PP).", min=1, max=MAX_RANKS)
    virtual_pipeline_model_parallel_size: int | None = option(
        None, "Model chunks per pipeline rank (interleaved 1F1B); unset for none.", min=1, max=MAX_LAYERS)
    context_parallel_size: int = option(1, "Ranks a sequence is split over (CP).", min=1, max=MAX_RANKS)
    expert_model_parallel_size: int = option(1, "Ranks the experts are spread over (EP).", min=1, max=MAX_RANKS)
    expert_tensor_parallel_size: int | None = option(
        None, "Tensor parallelism inside each expert (ETP).", min=1,
        derived="tensor_model_parallel_size", max=MAX_RANKS)
    sequence_parallel: bool = option(
        False, "Split norms/dropout activations over the TP ranks (needs TP > 1)."
    )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )


def derive_parallel(parallel: ParallelConfig) -> ParallelConfig:
    return attrs.evolve(
        parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size
        or parallel.tensor_model_parallel_size,
    )
