"""RecipeConfig: one frozen object holding every section of a compiled recipe."""

import attrs

from ..modes import resolved_mode
from ._fields import option
from .io import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ProfilingConfig,
    TokenizerConfig,
    derive_checkpoint,
)
from .launch import LaunchConfig, PeftConfig
from .model import ModelConfig, derive_model
from .parallel import ParallelConfig, derive_parallel
from .training import OptimizerConfig, PrecisionConfig, SchedulerConfig, TrainConfig


def _section(cls: type) -> object:
    return attrs.field(factory=cls, kw_only=True, metadata={"section": True})


@attrs.frozen
class RecipeConfig:
    """A whole recipe; each attribute is one TOML table."""

    name: str = option("recipe", "Recipe name (defaults to the file name).")
    description: str = option("", "One line shown by `recipec list`.")
    model: ModelConfig = _section(ModelConfig)
    parallel: ParallelConfig = _section(ParallelConfig)
    train: TrainConfig = _section(TrainConfig)
    optimizer: OptimizerConfig = _section(OptimizerConfig)
    scheduler: SchedulerConfig = _section(SchedulerConfig)
    precision: PrecisionConfig = _section(PrecisionConfig)
    data: DataConfig = _section(DataConfig)
    tokenizer: TokenizerConfig = _section(TokenizerConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    profiling: ProfilingConfig = _section(ProfilingConfig)
    peft: PeftConfig = _section(PeftConfig)
    launch: LaunchConfig = _section(LaunchConfig)


def derive(config: RecipeConfig) -> RecipeConfig:
    """Fill every derived field; idempotent on an already derived config."""
    scheduler = config.scheduler
    decay = scheduler.lr_decay_iters or config.train.train_iters
    warmup = scheduler.lr_warmup_iters
    if warmup is None:
        warmup = int(scheduler.lr_warmup_fraction * decay) if scheduler.lr_warmup_fraction else 0
    scheduler = attrs.evolve(scheduler, lr_decay_iters=decay, lr_warmup_iters=warmup)
    return attrs.evolve(
        config,
        model=derive_model(config.model),
        parallel=derive_parallel(config.parallel),
        scheduler=scheduler,
        checkpoint=derive_checkpoint(config.checkpoint, config.launch.accelerator),
        train=attrs.evolve(config.train, mode=resolved_mode(config)),  # compiler/modes: the derivation rule
    )


def section_names() -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(RecipeConfig) if f.metadata.get("section"))
