"""The model-family registry: every non-underscore module of this package contributes its `FAMILIES`.

No central list: a family is found by `pkgutil.iter_modules`, so adding one is adding
compiler/families/<name>.py (and runtime/families/<name>.py for its weights and layer spec).
Torch-free, like the whole compiler; the modules are imported on first use only.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING

from ..errors import Problem, RecipeError, did_you_mean
from ..plugins import collect
from .base import Family, FamilyProblem, ModelFields

if TYPE_CHECKING:
    from ..schema import ModelConfig

__all__ = ["Family", "FamilyProblem", "ModelFields", "all_families", "check", "for_hf_model_type", "get", "names"]


@cache
def _registry() -> dict[str, Family]:
    return collect(__name__, __path__, "FAMILIES", "model family")


def all_families() -> tuple[Family, ...]:
    """Every known family, sorted by name."""
    return tuple(_registry()[name] for name in sorted(_registry()))


def names() -> tuple[str, ...]:
    return tuple(sorted(_registry()))


def unknown_message(name: str) -> tuple[str, str]:
    """(message, hint) for a model.architecture no family has: the known ones and the closest."""
    known = names()
    message = f"{name!r} is not a model family recipec knows (known: {', '.join(repr(n) for n in known)})"
    hint = did_you_mean(name, known) or "each family is a module in recipec/compiler/families/"
    return message, hint


def get(name: str) -> Family:
    """The family `model.architecture = name`; a RecipeError listing the known ones otherwise."""
    family = _registry().get(name)
    if family is None:
        message, hint = unknown_message(name)
        raise RecipeError([Problem(RecipeError, message, key="model.architecture", hint=hint)])
    return family


def for_hf_model_type(model_type: str) -> Family | None:
    """The family that imports config.json's `model_type`, or None."""
    for family in all_families():
        if model_type in family.hf_model_types:
            return family
    return None


def hf_model_types() -> tuple[str, ...]:
    return tuple(sorted(mt for f in all_families() for mt in f.hf_model_types))


def check(model: ModelConfig) -> Iterator[tuple[str, str, str | None]]:
    """validate.py's findings for the family: an unknown name, else the family's own rules."""
    family = _registry().get(model.architecture)
    if family is None:
        yield ("model.architecture", *unknown_message(model.architecture))
        return
    for p in family.validate(model):
        yield (p.key, p.message, p.hint)
