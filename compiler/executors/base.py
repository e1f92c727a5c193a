"""What an executor plug-in is, and what it may read of a compiled recipe.

An executor (`launch.executor`) owns the `[launch]` rules only it cares about, the scripts
it writes into the build directory, and how it starts them. It reads a compiled recipe
through the `Built` protocol (config, plan, fingerprint, artifact directory) and never
imports `api`, so `api` can ask it what to write without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..plan import Plan
    from ..schema import RecipeConfig
    from ..tree import Tree

Echo = Callable[..., None]
Finding = tuple[tuple[str, ...], str, str | None]  # (key path in the recipe tree, message, hint)


class LaunchError(RecipeError):
    """A launch that cannot start: missing scheduler or torch, bad node rank, a refused submission,
    a machine that cannot run the recipe (preflight.py)."""


class Built(Protocol):
    """The parts of a compiled recipe an executor reads (api.Compiled has them)."""

    @property
    def config(self) -> RecipeConfig: ...
    @property
    def plan(self) -> Plan: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def artifact_dir(self) -> str: ...
    @property
    def tree(self) -> Tree: ...  # provenance, for messages that name where a value was set
    @property
    def name(self) -> str: ...

    def write(self, out_dir: str | Path | None = None, *, python: str | None = None) -> Path: ...


@attrs.frozen
class ScriptFile:
    """One file an executor writes into the build directory."""

    name: str
    text: str
    executable: bool = True


class Executor(Protocol):
    """A `launch.executor` plug-in."""

    name: str
    # Every file name this executor may write; the build directory drops the others' stale copies.
    script_names: tuple[str, ...]

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        """Problems with the `[launch]` settings this executor uses (on top of the shared ones)."""
        ...

    def scripts(self, built: Built, python: str | None = None) -> list[ScriptFile]:
        """The files to write. `python`: the interpreter on the nodes (None: `python` / `torchrun` on PATH)."""
        ...

    def launch(self, built: Built, *, out: str | None, dry_run: bool, node_rank: int | None, echo: Echo,
               verbose: bool = False) -> int:
        """Write the build directory, then run or submit it; return the exit code. `verbose`: the job's
        processes get `supervisor.VERBOSE_ENV` (every line shown), by whatever way reaches them."""
        ...
