"""Writing compiled recipes: resolved TOML with provenance, canonical JSON, fingerprint.

Output is a pure function of the config (sorted, no timestamps), so building
twice gives byte-identical files and the fingerprint is stable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .schema import RecipeConfig
from .schema._fields import is_free_table
from .sources import describe_chain
from .text import one_line
from .tree import Tree


def config_to_dict(config: RecipeConfig) -> dict[str, Any]:
    """Plain data for JSON: tuples become lists, None stays None."""
    return attrs.asdict(config, value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(config_dict: dict[str, Any], plan_dict: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the resolved config and the plan."""
    payload = canonical_json({"config": config_dict, "plan": plan_dict})
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def toml_value(value: Any) -> str:
    """One TOML value. Strings are basic strings in ASCII (see `toml_string`); a value TOML cannot
    hold is a TypeError: every value comes from the schema, so that is a bug, not a user mistake."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    """A TOML basic string in ASCII: quotes, backslashes, control characters and DEL escaped,
    non-ASCII as \\uXXXX or \\UXXXXXXXX. It writes the same bytes as json.dumps (so earlier
    artifacts are unchanged) except above U+FFFF, where JSON's surrogate pairs are not TOML.
    A lone surrogate cannot be written at all: the schema refuses it."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif 0xD800 <= code <= 0xDFFF:
            raise TypeError(f"cannot write the lone surrogate {ch!r} as TOML")
        elif code > 0xFFFF:
            out.append(f"\\U{code:08x}")
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    """A key: bare when TOML allows it bare (ASCII letters, digits, _ and -), else quoted."""
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_comment(text: str) -> str:
    """`# text` on one line: any line break or control character in `text` is spelled as an escape,
    so data in a comment (a path, an override, a config.json string) can never start a TOML line."""
    return f"# {one_line(text)}" if text else "#"


def toml_document(data: dict[str, Any], header: Sequence[str] = (),
                  notes: Mapping[str, Sequence[str]] | None = None) -> str:
    """A whole TOML file written only from values: `header` comment lines, the top-level values,
    then one [table] per table of `data` (deeper tables inline), each after its `notes` comments.
    The one way recipec writes a recipe a person will edit (`recipec import-hf`)."""
    lines = [toml_comment(line) for line in header]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines += ["", *(toml_comment(n) for n in (notes or {}).get(name, ())), f"[{toml_key(name)}]"]
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def resolved_toml(config: RecipeConfig, tree: Tree, header: str = "") -> str:
    """Every field of the config, one per line, with where it came from as a comment."""
    lines = [toml_comment(line) for line in header.splitlines()]
    for field in attrs.fields(RecipeConfig):
        if not field.metadata.get("section"):
            lines.append(_line((field.name,), getattr(config, field.name), tree))
    for field in attrs.fields(RecipeConfig):
        if field.metadata.get("section"):
            lines += ["", *section_lines(config, tree, field.name)]
    return "\n".join(lines).lstrip("\n") + "\n"


def section_lines(config: RecipeConfig, tree: Tree, name: str) -> list[str]:
    """`[name]` and its fields, each with its provenance. A free table that has entries
    (`[launch.env]`) follows as a table of its own, one entry per line with the entry's own
    provenance: an entry added by `+launch.env.X=1` or an overlay says so."""
    section = getattr(config, name)
    lines, tables = [f"[{name}]"], []
    for sub in attrs.fields(type(section)):
        value = getattr(section, sub.name)
        if is_free_table(sub.type) and value:
            tables += ["", f"[{name}.{toml_key(sub.name)}]"]
            tables += [_line((name, sub.name, k), v, tree) for k, v in value.items()]
        else:
            lines.append(_line((name, sub.name), value, tree, sub))
    return lines + tables


def origin_of(path: tuple[str, ...], value: Any, tree: Tree, field: attrs.Attribute | None = None) -> str:
    """Where a resolved value came from: its provenance chain, the derivation, or the default.
    An entry of a free table without a chain of its own has its table's (a whole table set at once)."""
    chain = tree.chains.get(path) or (tree.chains.get(path[:-1]) if field is None and len(path) > 2 else None)
    if chain:
        return describe_chain(chain)
    if field is not None and field.metadata.get("derived") and value is not None:
        return f"derived: {field.metadata['derived']}"
    return "default"


def _line(path: tuple[str, ...], value: Any, tree: Tree, field: attrs.Attribute | None = None) -> str:
    origin = origin_of(path, value, tree, field)
    if value is None:
        return f"# {toml_key(path[-1])} = (unset)  {toml_comment(origin)}"
    return f"{toml_key(path[-1])} = {toml_value(value)}  {toml_comment(origin)}"
