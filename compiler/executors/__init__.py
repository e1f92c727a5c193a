"""Executor plug-ins, found by their recipe key `launch.executor` (design: Plug-ins).

Each executor is one module here with an `EXECUTOR` object (see base.Executor): its own
`[launch]` rules, the scripts it writes into the build directory, and how it starts them.
Adding one is a module and a line in `EXECUTORS`; nothing else names an executor.

This package's top level imports nothing of the compiler, so the schema can take its
`launch.executor` choices from `EXECUTORS`; the modules load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import Executor, Finding

# launch.executor value -> module of this package that defines EXECUTOR
EXECUTORS: dict[str, str] = {
    "local": "local",
    "slurm": "slurm",
}


def executor_for(name: str) -> Executor:
    """The plug-in for `launch.executor = name` (the schema has already refused unknown names)."""
    return importlib.import_module(f"{__name__}.{EXECUTORS[name]}").EXECUTOR


def script_names() -> set[str]:
    """Every file any executor writes: a build directory drops the ones its executor does not."""
    return {n for name in EXECUTORS for n in executor_for(name).script_names}


def rules(config: RecipeConfig) -> Iterator[Finding]:
    """Every launch problem of this recipe: the shared `[launch]` rules, the name, the executor's own."""
    from ..schema.launch import launch_rules
    from ..shell import script_text_problem

    problem = script_text_problem(config.name)
    if problem:
        yield (("name",), f"the name {config.name!r} {problem}", "use letters, digits, _ . + -")
    yield from launch_rules(config.launch)
    yield from executor_for(config.launch.executor).rules(config)
