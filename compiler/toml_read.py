"""tomllib, made total: any text gives a dict or one `TomlReadError` with a line.

tomllib raises more than TOMLDecodeError on hostile input: RecursionError for
arrays or inline tables nested a few hundred deep, ValueError for an integer of
more than 4300 digits. And what it returns can be nested deeper than the rest of
the compiler (recursive merges, checks, writers) should ever walk. A recipe
nests at most `MAX_NESTING` levels (the schema needs 4: section, free table,
key, list), so everything deeper is refused here, once, with the line.
"""

from __future__ import annotations

import re
import sys
import tomllib
from typing import Any

import attrs

from .toml_lines import key_lines, line_of

MAX_NESTING = 32  # tables + arrays; far above the schema's 4, far below Python's recursion limit
_LINE_COL = re.compile(r"\(at line (\d+), column (\d+)\)")
MAX_DIGITS = sys.get_int_max_str_digits() or 4300  # what int() converts (0: unlimited)
_LONG_INT = re.compile(rf"[0-9_]{{{MAX_DIGITS + 1},}}")

Path = tuple[str, ...]


@attrs.frozen
class TomlReadError(Exception):
    """Why a text is not a recipe's TOML: the message, and the line and key when known."""

    message: str
    line: int | None = None
    key: Path = ()

    def __str__(self) -> str:
        return self.message


def loads(text: str) -> dict[str, Any]:
    """Parse `text`; raise TomlReadError for anything tomllib or the nesting limit refuses."""
    deep_key = _deep_key_line(text)
    if deep_key is not None:  # before tomllib, which takes time quadratic in a key's parts
        raise TomlReadError(f"a dotted key of more than {MAX_NESTING} parts (nested deeper than {MAX_NESTING} "
                            "levels of tables)", deep_key)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _LINE_COL.search(str(exc))
        raise TomlReadError(_LINE_COL.sub("", str(exc)).strip(), int(match.group(1)) if match else None) from None
    except RecursionError:
        raise TomlReadError(f"arrays or inline tables nested deeper than {MAX_NESTING} levels",
                            _deep_line(text)) from None
    except ValueError:  # int(): more digits than Python converts
        match = _LONG_INT.search(text)
        line = text.count("\n", 0, match.start()) + 1 if match else None
        raise TomlReadError(f"an integer with more than {MAX_DIGITS} digits", line) from None
    deep = too_deep(data)
    if deep is not None:
        lines = key_lines(text)
        line = line_of(lines, deep) or next((n for p, n in lines.items() if p[: len(deep)] == deep), None)
        raise TomlReadError(f"nested deeper than {MAX_NESTING} levels of tables and arrays", line, deep)
    return data


def too_deep(value: Any, limit: int = MAX_NESTING) -> Path | None:
    """The key path (list items as their index) of the first value nested deeper than `limit`
    tables and arrays, or None. Iterative, so it is safe on any depth."""
    stack: list[tuple[Any, Path, int]] = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            items: Any = ((str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            continue
        if depth >= limit:
            return path
        stack.extend((v, path + (k,), depth + 1) for k, v in items)
    return None


_STRINGS = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
_AROUND_DOTS = re.compile(r"[ \t]*\.[ \t]*")
_GAPS = re.compile(r"[\s=\[\]{},]+")


def _deep_key_line(text: str) -> int | None:
    """The line of a dotted key with more than MAX_NESTING parts, found without tomllib: outside
    strings and comments only keys have more than one dot (numbers and dates have at most one)."""
    if text.count(".") < MAX_NESTING:
        return None
    bare = _STRINGS.sub(lambda m: "x" + "\n" * m.group().count("\n"), text)
    for number, line in enumerate(bare.split("\n"), 1):
        if line.count(".") >= MAX_NESTING:
            line = _AROUND_DOTS.sub(".", line)
            if any(token.count(".") >= MAX_NESTING for token in _GAPS.split(line)):
                return number
    return None


def _deep_line(text: str) -> int | None:
    """The line where brackets first nest deeper than MAX_NESTING (strings and comments skipped)."""
    depth, line, quote, i = 0, 1, "", 0
    while i < len(text):
        ch = text[i]
        if ch == "\n":
            line += 1
        elif quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end - 1
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        elif ch in "]}":
            depth -= 1
        i += 1
    return None
