"""Where a value came from.

Every leaf of a recipe carries a chain of `Source`s, oldest first, so that an
error or `recipec explain` can say "llama3_8b.toml:12, overridden by CLI
'train.train_iters=100'" instead of just printing a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from .text import shown

SourceKind = Literal["default", "file", "overlay", "cli", "python", "derived"]

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def display_path(path: Path) -> str:
    """A short, stable spelling of a recipe path for messages and artifacts.

    Relative to the working directory when the file is below it, relative to the
    repository for bundled recipes, absolute otherwise; never machine-dependent
    for bundled recipes, so compiled artifacts stay byte-identical.
    """
    path = path.resolve()
    for root in (Path.cwd().resolve(), _PACKAGE_ROOT):
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.as_posix()


@attrs.frozen
class Source:
    """One place a value was set."""

    kind: SourceKind
    file: str | None = None
    line: int | None = None
    detail: str | None = None

    def __str__(self) -> str:
        """On one line and clipped: a file name or an override string is user text."""
        where = shown(self.file or "")
        if self.line is not None:
            where = f"{where}:{self.line}"
        if self.kind == "file":
            return where
        if self.kind == "overlay":
            return f"overlay {where}"
        if self.kind == "cli":
            return f"CLI '{shown(self.detail or '')}'"
        if self.kind == "python":
            return f"Python ({shown(self.detail)})" if self.detail else "Python"
        if self.kind == "derived":
            return f"derived: {shown(self.detail or '')}"
        return "default"


DEFAULT = Source("default")


def describe_chain(chain: list[Source] | tuple[Source, ...]) -> str:
    """'a.toml:3 -> overridden by CLI ...' for a provenance chain, newest last."""
    if not chain:
        return "default"
    parts = [str(chain[0])]
    parts += [f"overridden by {s}" for s in chain[1:]]
    return ", ".join(parts)
