"""The runtime model-family registry: every non-underscore module here contributes its `FAMILIES`.

The counterpart of compiler/families (same names): found with `pkgutil.iter_modules`, so a new
family is a new module, never an edit of a central table.
"""

from __future__ import annotations

from functools import cache

from recipec.compiler.errors import RecipeError, did_you_mean
from recipec.compiler.plugins import collect

from .base import RuntimeFamily, SpecContext

__all__ = ["RuntimeFamily", "SpecContext", "all_families", "get"]


@cache
def _registry() -> dict[str, RuntimeFamily]:
    return collect(__name__, __path__, "FAMILIES", "runtime family")


def all_families() -> tuple[RuntimeFamily, ...]:
    return tuple(_registry()[name] for name in sorted(_registry()))


def get(name: str) -> RuntimeFamily:
    """The runtime half of `model.architecture = name`."""
    family = _registry().get(name)
    if family is None:
        known = sorted(_registry())
        hint = did_you_mean(name, known)
        raise RecipeError(f"model.architecture {name!r} has no runtime family (known: {', '.join(known)})"
                          + (f"; {hint}" if hint else ""))
    return family
