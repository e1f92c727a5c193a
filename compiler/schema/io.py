"""[data], [tokenizer], [checkpoint], [logging], [profiling]: what goes in and out."""

import attrs

from ._fields import option
from .bounds import MAX_KEEP, MAX_STEPS, MAX_WORKERS


@attrs.frozen
class DataConfig:
    """Where the tokens come from."""

    kind: str = option(
        "mock", "mock: random tokens (MockGPTDataset); indexed: Megatron .bin/.idx blend; "
        "text: plain text files packed into an indexed dataset at start; sft: jsonl "
        "prompt/response records.",
        choices=("mock", "indexed", "text", "sft"),
    )
    paths: tuple[str, ...] = option((), "Dataset prefixes (indexed), text files (text) or jsonl files (sft).")
    weights: tuple[float, ...] = option((), "Blend weight per path; empty for equal weights.")
    split: str = option("969,30,1", "Train,valid,test proportions.")
    cache_dir: str | None = option(None, "Where built dataset indices are cached.")
    num_workers: int = option(2, "DataLoader workers per rank.", min=0, max=MAX_WORKERS)
    packing: bool = option(
        False, "sft: concatenate examples into full sequences (attention and position ids restart per "
        "example) instead of padding one example per sequence; needs train.micro_batch_size = 1.")


@attrs.frozen
class TokenizerConfig:
    """How text becomes token ids."""

    type: str = option(
        "null", "null: ids are the data (mock); byte: UTF-8 bytes; huggingface: a local HF tokenizer.",
        choices=("null", "byte", "huggingface"),
    )
    path: str | None = option(None, "Local directory of the HF tokenizer.")


@attrs.frozen
class CheckpointConfig:
    """Megatron dist checkpoints: where, how often, how many, and what to start from."""

    save: str | None = option(None, "Directory to save to; unset for no checkpoints.")
    save_interval: int | None = option(None, "Save every N steps (and at the end).", min=1, max=MAX_STEPS)
    keep_last: int | None = option(None, "Keep only the newest N checkpoints.", min=1, max=MAX_KEEP)
    load: str | None = option(None, "Resume from here (defaults to `save` when it has one).")
    pretrained: str | None = option(
        None, "Start weights (dist checkpoint or HF directory) for a finetune; no optimizer state."
    )
    format: str = option("torch_dist", "Dist checkpoint backend.", choices=("torch_dist",))
    optimizer_sharding: str = option(
        "auto",
        "Distributed-optimizer state layout: dp_reshardable writes each rank's shard as it is (fast, no "
        "exchange) but resumes only under the same TP/PP; fully_reshardable first gathers the state into "
        "per-parameter tensors (resumes under any TP/PP/DP; on a 1B model ~60 s per save on an H200); auto "
        "saves dp_reshardable during the run and fully_reshardable at its end.",
        choices=("auto", "fully_reshardable", "dp_reshardable"),
    )
    async_save: bool | None = option(
        None, "Write checkpoints in the background while training continues (staged to host memory first); "
        "a stop signal and the end of the run wait for the write.", derived='true unless launch.accelerator is "cpu"',
    )


def derive_checkpoint(checkpoint: CheckpointConfig, accelerator: str) -> CheckpointConfig:
    """async_save on GPU by default: the save stall is the D2H copy instead of the write. On CPU
    the background write competes with training for the same cores, so it stays synchronous."""
    if checkpoint.async_save is not None:
        return checkpoint
    return attrs.evolve(checkpoint, async_save=accelerator != "cpu")


@attrs.frozen
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = option(10, "Print metrics every N steps.", min=1, max=MAX_STEPS)
    tensorboard_dir: str | None = option(None, "Write TensorBoard events here.")
    wandb_project: str | None = option(None, "Weights & Biases project; unset for none.")
    wandb_exp_name: str | None = option(None, "Weights & Biases run name.")
    log_memory: bool = option(True, "Report peak memory per rank.")


@attrs.frozen
class ProfilingConfig:
    """Capture a profile of steps [profile_step_start, profile_step_end)."""

    use_nsys: bool = option(False, "Wrap the run in nsys with a cudaProfilerApi capture range.")
    use_torch_profiler: bool = option(False, "Record a torch.profiler trace.")
    profile_step_start: int = option(10, "First profiled step.", min=0, max=MAX_STEPS)
    profile_step_end: int = option(12, "Step after the last profiled one.", min=1, max=MAX_STEPS)
    profile_ranks: tuple[int, ...] = option((0,), "Global ranks that profile.")
    record_shapes: bool = option(False, "torch profiler: record input shapes.")
