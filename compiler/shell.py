"""Shell text from data: the one module that writes generated scripts and printed command lines.

Recipes are data, and data must never run. Every word that comes from a recipe, an
overlay, the command line or a path is quoted with `shlex.quote` and nothing else (no
"safe characters" shortcut: a word like `/runs/${X@P}` would otherwise be expanded by the
shell). Where a script needs the *value of a shell variable* at run time (SLURM_NODEID,
HEAD_NODE, NODE_RANK), the caller says so with a `ShellVar`, whose name is checked to be an
identifier and which renders as `"$NAME"`; no user string is ever pattern-matched into one.

A `bash -c` body is built by quoting each word, then the whole body is quoted once more as
one word. Lines that are code (the fixed parts of a template) go in through `Script.code`
and must be literals of the module that writes them, never text derived from data.

Values that would end a line or cannot be stored in a script (newline, carriage return, NUL)
are refused here as a programming error: the compiler refuses them earlier, with a
RecipeError that names the key (see `script_text_problem`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence

import attrs

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What SLURM's #SBATCH parser treats specially (it splits on whitespace and reads quotes,
# backslashes and `#` itself, not as the shell does); a directive value carries none of them.
_DIRECTIVE_SPECIAL = re.compile(r"[\s'\"\\#]")


class UnsafeText(ValueError):
    """Text that must not reach a script; the compiler's checks should have refused it first."""


def is_identifier(name: str) -> bool:
    """Whether `name` can be an environment variable / shell variable name."""
    return IDENTIFIER.fullmatch(name) is not None


def script_text_problem(value: str) -> str | None:
    """Why `value` cannot appear in a generated script, or None (newline, carriage return, NUL)."""
    for ch, what in (("\n", "a newline"), ("\r", "a carriage return"), ("\x00", "a NUL character")):
        if ch in value:
            return f"holds {what}, which would start a new line of the generated script or cut it short"
    return None


def _check_text(value: str) -> str:
    problem = script_text_problem(value)
    if problem:
        raise UnsafeText(f"{value!r} {problem}")
    return value


@attrs.frozen
class ShellVar:
    """The run-time value of shell variable `name`, rendered as "$name" (double-quoted: one word)."""

    name: str = attrs.field()

    @name.validator
    def _identifier(self, _attribute: attrs.Attribute, value: str) -> None:
        if not is_identifier(value):
            raise UnsafeText(f"{value!r} is not a shell variable name")

    def render(self) -> str:
        return f'"${self.name}"'


@attrs.frozen
class Word:
    """One argv word made of literal text and shell variables: `--node-rank=` + $SLURM_NODEID."""

    parts: tuple[str | ShellVar, ...]

    def render(self) -> str:
        rendered = [p.render() if isinstance(p, ShellVar) else shlex.quote(_check_text(p)) for p in self.parts if p != ""]
        return "".join(rendered) or "''"


Arg = str | ShellVar | Word


def word(*parts: str | ShellVar) -> Word:
    """A word of literal text and shell variables, e.g. word(ShellVar("HEAD_NODE"), ":29500")."""
    return Word(tuple(parts))


def quote(arg: Arg | int) -> str:
    """One word: a string through shlex.quote, a ShellVar or Word as above."""
    if isinstance(arg, (ShellVar, Word)):
        return arg.render()
    return shlex.quote(_check_text(str(arg)))


def join(argv: Iterable[Arg | int]) -> str:
    """A command line: each word quoted on its own."""
    return " ".join(quote(a) for a in argv)


def literal(argv: Sequence[Arg]) -> list[str]:
    """argv as plain strings for subprocess; refuses shell variables (there is no shell to expand them)."""
    out = []
    for a in argv:
        if not isinstance(a, str):
            raise UnsafeText(f"{a!r} needs a shell to expand it; this argv runs without one")
        out.append(a)
    return out


def bash_c(code_prefix: str, argv: Sequence[Arg]) -> list[Arg]:
    """`bash -c BODY` as argv: BODY is the trusted `code_prefix` (e.g. "exec ") then the words, each
    quoted; joining the result quotes BODY as one word, so the outer shell passes it on verbatim."""
    return ["bash", "-c", code_prefix + join(argv)]


def directive_value(value: str | int) -> str:
    """A value for a `#SBATCH --flag=VALUE` line: plain text only (see _DIRECTIVE_SPECIAL)."""
    text = _check_text(str(value))
    if _DIRECTIVE_SPECIAL.search(text):
        raise UnsafeText(f"{text!r} holds whitespace, a quote, a backslash or `#`, which #SBATCH lines cannot carry")
    return text


class Script:
    """A bash script built line by line; data enters only through the quoting methods."""

    def __init__(self, shebang: str | None = "#!/usr/bin/env bash") -> None:
        self.lines: list[str] = [shebang] if shebang else []

    def code(self, *lines: str) -> Script:
        """Fixed template lines. Callers pass literals of their own module, never data."""
        self.lines += [_check_text(line) for line in lines]
        return self

    def comment(self, text: str) -> Script:
        self.lines.append("# " + _check_text(text) if text else "#")
        return self

    def directive(self, prefix: str, flag: str, value: str | int | None = None) -> Script:
        """`#SBATCH --flag` or `#SBATCH --flag=value`."""
        if not flag.startswith("--") or _DIRECTIVE_SPECIAL.search(flag):
            raise UnsafeText(f"bad directive flag {flag!r}")
        self.lines.append(f"{prefix} {flag}" if value is None else f"{prefix} {flag}={directive_value(value)}")
        return self

    def assign(self, name: str, value: str | int, *, export: bool = False) -> Script:
        if not is_identifier(name):
            raise UnsafeText(f"{name!r} is not a shell variable name")
        self.lines.append(("export " if export else "") + f"{name}={quote(value)}")
        return self

    def exports(self, env: dict[str, str]) -> Script:
        for name, value in env.items():
            self.assign(name, value, export=True)
        return self

    def command(self, argv: Sequence[Arg], *, before: str = "", after: str = "") -> Script:
        """A command line; `before` / `after` are trusted code ("exec ", ' "$@"', " &")."""
        self.lines.append(_check_text(before) + join(argv) + _check_text(after))
        return self

    def blank(self) -> Script:
        self.lines.append("")
        return self

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
