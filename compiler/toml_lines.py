"""Line numbers of TOML keys.

tomllib gives values but not positions; this scanner recovers, for every key
assignment and table header, the line it is on, so errors can say
`recipe.toml:12`. It only has to be right for the lines tomllib accepted.
"""

from __future__ import annotations

import re

Path = tuple[str, ...]

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_KEY_PART = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")


def _split_key(dotted: str) -> Path:
    return tuple(part.strip("\"'") for part in _KEY_PART.findall(dotted))


def key_lines(text: str) -> dict[Path, int]:
    """Map each table header and assigned key path to its 1-based line."""
    lines: dict[Path, int] = {}
    table: Path = ()
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_multiline is not None:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header and not _ASSIGN.match(line):
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            path = table + _split_key(assign.group(1))
            lines.setdefault(path, number)
            rest = line[assign.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest enclosing key (inline tables)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def key_at(text: str, line: int) -> Path:
    """Best guess of the dotted key being written on `line` (1-based) of a possibly invalid file:
    the enclosing table plus the key assigned there, for error messages."""
    table: Path = ()
    lines = text.splitlines()
    for current in lines[: line - 1]:
        header = _HEADER.match(current)
        if header and not _ASSIGN.match(current):
            table = _split_key(header.group(1))
    here = lines[line - 1] if 0 < line <= len(lines) else ""
    header = _HEADER.match(here)
    if header and not _ASSIGN.match(here):
        return _split_key(header.group(1))
    assign = _ASSIGN.match(here)
    return table + _split_key(assign.group(1)) if assign else table


def starts_statement(line: str) -> bool:
    """Whether `line` begins a `key = value` or a `[table]` header (not an array's next item)."""
    return bool(_ASSIGN.match(line) or _HEADER.match(line))
