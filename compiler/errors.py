"""The one error type of recipec, and the value each problem is carried in.

Compiling collects `Problem`s (errors as values) and raises them together, once,
at the boundary, as a `RecipeError` whose message names file, line and key and
says how to fix it. The CLI prints that message and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import attrs

from .sources import Source
from .text import shown

MAX_SHOWN = 50  # problems printed in full; the rest are counted
MAX_LINE = 500  # characters of one message line


class RecipeError(Exception):
    """A user mistake in a recipe, an override or an artifact."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(type(self), problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0].render()
        lines = [f"{len(self.problems)} problems in this recipe:"]
        for i, problem in enumerate(self.problems[:MAX_SHOWN], 1):
            body = problem.render().replace("\n", "\n   ")
            lines.append(f"{i}. {body}")
        if len(self.problems) > MAX_SHOWN:  # a generated recipe can have 100k; the first ones say enough
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more")
        return "\n".join(lines)

    @staticmethod
    def of(problems: Iterable[Problem]) -> RecipeError:
        """The most specific subclass that covers all problems."""
        problems = tuple(problems)
        kinds = {p.kind for p in problems}
        cls = kinds.pop() if len(kinds) == 1 else RecipeError
        return cls(problems)


class TomlSyntaxError(RecipeError):
    """The file is not valid TOML."""


class RecipeNotFoundError(RecipeError):
    """A recipe, parent or overlay file does not exist."""


class CyclicExtendsError(RecipeError):
    """`extends` leads back to a recipe already being loaded."""


class ExtendsLimitError(RecipeError):
    """An `extends` chain deeper, or reaching more files, than any hand-written recipe does."""


class UnknownKeyError(RecipeError):
    """A key the schema does not have."""


class TypeMismatchError(RecipeError):
    """A value of the wrong type or outside the allowed values."""


class OverrideError(RecipeError):
    """A malformed override string."""


class ValidationError(RecipeError):
    """Values that are each fine but impossible together."""


class ArtifactError(RecipeError):
    """A compiled artifact that is missing, tampered with or from another version."""


@attrs.frozen
class Problem:
    """One thing wrong, where it is, and how to fix it."""

    kind: type[RecipeError]
    message: str
    key: str | None = None
    source: Source | None = None
    hint: str | None = None

    def render(self) -> str:
        head = ""
        if self.source is not None and self.source.kind != "default":
            head = f"{self.source}: "
        if self.key:
            head += f"[{shown(self.key)}] "
        text = head + self.message
        if self.hint:
            text += f"\n   hint: {self.hint}"
        # Messages quote user text (keys, names, values): each line stays one line and readable.
        return "\n".join(shown(line, MAX_LINE) for line in text.split("\n"))


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `word`, if any is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """'did you mean `x`?' for the closest choice, if any is close."""
    match = closest(word, choices)
    return f"did you mean `{match}`?" if match else None
