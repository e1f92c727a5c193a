"""recipec.compiler: TOML recipes -> frozen attrs configs + launch plan.

Pure Python (tomllib, attrs, click); never imports torch, Megatron or TE.

    from recipec.compiler import build
    compiled = build("llama3_8b", ["train.train_iters=100"])
    compiled.config.model.num_layers, compiled.plan.world_size
"""

from .api import Compiled, build, compile_tree, from_config
from .errors import (
    ArtifactError,
    CyclicExtendsError,
    ExtendsLimitError,
    OverrideError,
    RecipeError,
    RecipeNotFoundError,
    TomlSyntaxError,
    TypeMismatchError,
    UnknownKeyError,
    ValidationError,
)
from .schema import *  # noqa: F403
from .schema import __all__ as _schema_all

__all__ = [
    "ArtifactError", "Compiled", "CyclicExtendsError", "ExtendsLimitError", "OverrideError", "RecipeError",
    "RecipeNotFoundError", "TomlSyntaxError", "TypeMismatchError", "UnknownKeyError",
    "ValidationError", "build", "compile_tree", "from_config", *_schema_all,
]
