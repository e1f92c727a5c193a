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

from .toml_lines import key_at, key_lines, line_of

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
    # The array, inline table or multi-line string still open where tomllib stopped, when it began
    # on an earlier line or runs past the end of its own line: (what, the line it opened on).
    opened: tuple[str, int] | None = None
    at_end: bool = False  # tomllib reached the end of the text (`line` is then the last line)

    def __str__(self) -> str:
        return self.message + (f" {_AT_END}" if self.at_end else "")


def loads(text: str) -> dict[str, Any]:
    """Parse `text`; raise TomlReadError for anything tomllib or the nesting limit refuses."""
    deep_key = _deep_key_line(text)
    if deep_key is not None:  # before tomllib, which takes time quadratic in a key's parts
        raise TomlReadError(f"a dotted key of more than {MAX_NESTING} parts (nested deeper than {MAX_NESTING} "
                            "levels of tables)", deep_key)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(text, str(exc)) from None
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


_AT_END = "(at end of document)"


def _decode_error(text: str, raw: str) -> TomlReadError:
    """tomllib's message with its line, and the array, inline table or multi-line string that is
    still open there when it began on an earlier line or runs past its own line's end: tomllib
    notices `foo = [1, 2,` only on the next key's line, where the mistake is not."""
    match = _LINE_COL.search(raw)
    message = _LINE_COL.sub("", raw).replace(_AT_END, "").strip()
    at_end = match is None and _AT_END in raw
    if match:
        line, col = int(match.group(1)), int(match.group(2))
        start = 0
        for _ in range(line - 1):
            start = text.find("\n", start) + 1
        offset = min(start + col - 1, len(text))
    elif at_end:
        offset, line = len(text), text.rstrip("\n").count("\n") + 1
    else:
        return TomlReadError(message)
    stack, string = open_constructs(text, offset)
    opened = string or (stack[-1] if stack else None)
    if opened is not None:
        ends_line = offset >= len(text) or text[offset] in "\r\n"
        same_line_table = opened == ("inline table", line) and ends_line
        if opened[1] < line or at_end or same_line_table:
            outer = stack[0][1] if stack else opened[1]
            return TomlReadError(message, line, key_at(text, outer), opened, at_end)
    return TomlReadError(message, line, (), None, at_end)


_SCAN = re.compile(r"""\"\"\"|'''|["'#\[\]{}]""")
_BASIC = re.compile(r'(?:[^"\\\n]|\\.)*"')
_NAMES = {"[": "array", "{": "inline table"}


def open_constructs(text: str, end: int) -> tuple[list[tuple[str, int]], tuple[str, int] | None]:
    """What is open at offset `end` of `text`, scanning outside strings and comments: the arrays and
    inline tables as (what, line opened), outermost first, and a multi-line string `end` is inside.
    Table headers open and close on their line, so they are never left open before a later line."""
    stack: list[tuple[str, int]] = []
    pos, line, counted = 0, 1, 0
    while True:
        match = _SCAN.search(text, pos, end)
        if match is None:
            return stack, None
        token, pos = match.group(), match.end()
        line += text.count("\n", counted, match.start())
        counted = match.start()
        if token == "#":
            newline = text.find("\n", pos, end)
            pos = end if newline < 0 else newline
        elif token in ('"""', "'''"):
            close = _close_multiline(text, pos, end, token)
            if close is None:
                return stack, ("multi-line string", line)
            pos = close
        elif token == '"':
            basic = _BASIC.match(text, pos, end)
            pos = basic.end() if basic else pos
        elif token == "'":
            newline = text.find("\n", pos, end)
            quote = text.find("'", pos, end if newline < 0 else newline)
            pos = quote + 1 if quote >= 0 else pos
        elif token in "[{":
            stack.append((_NAMES[token], line))
        elif stack:
            stack.pop()


def _close_multiline(text: str, pos: int, end: int, quote: str) -> int | None:
    """The offset after the three quotes closing a multi-line string whose body starts at `pos`, or
    None when it does not close before `end`. Up to two more quotes belong to the body."""
    while True:
        at = text.find(quote, pos, end)
        if at < 0:
            return None
        if quote[0] == '"':
            start = at
            while start > pos and text[start - 1] == "\\":
                start -= 1
            if (at - start) % 2:  # an escaped quote: \""" is a quote and then two more
                pos = at + 1
                continue
        close = at + 3
        while close < end and close < at + 5 and text[close] == quote[0]:
            close += 1
        return close
