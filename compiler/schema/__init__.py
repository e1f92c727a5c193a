"""The recipe schema: frozen attrs classes, one per TOML table."""

from .io import CheckpointConfig, DataConfig, LoggingConfig, ProfilingConfig, TokenizerConfig
from .launch import LaunchConfig, PeftConfig
from .model import ModelConfig
from .parallel import ParallelConfig
from .recipe import RecipeConfig, derive, section_names
from .training import OptimizerConfig, PrecisionConfig, SchedulerConfig, TrainConfig

__all__ = [
    "CheckpointConfig", "DataConfig", "LaunchConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "PeftConfig", "PrecisionConfig", "ProfilingConfig",
    "RecipeConfig", "SchedulerConfig", "TokenizerConfig", "TrainConfig", "derive", "section_names",
]
