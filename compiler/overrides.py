"""Overrides applied after the recipe: overlay files, dotted strings, Python values.

Dotted strings read like Hydra's: `train.train_iters=100` sets a schema key,
`+launch.env.NCCL_DEBUG=INFO` adds a key to a free-form table (and is accepted on
any schema key), `~optimizer.min_lr` unsets a key so its default applies again.
Values parse as TOML values; a bare word that is not TOML is a string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .errors import OverrideError, Problem, RecipeError, did_you_mean
from .loader import load
from .sources import Source
from .structure import field_of
from .text import shown
from .toml_read import MAX_NESTING, TomlReadError, loads, too_deep
from .tree import Path, Tree, set_leaf, unset

_OVERRIDE = re.compile(r"^(?P<op>[+~]?)(?P<key>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)(?:=(?P<value>.*))?$", re.DOTALL)
_BARE = re.compile(r"^[A-Za-z0-9_\-./:@,%]+$")


def parse_value(text: str) -> Any:
    """A TOML value, or the text itself when it is a bare word such as `foo` or `a/b.txt`.
    Raises TomlReadError for anything else, including text that is more than one value
    (`1\nother = 2` must not smuggle in a second key)."""
    try:
        parsed = loads(f"v = {text}")
    except TomlReadError:
        if _BARE.match(text):
            return text
        raise
    if set(parsed) != {"v"}:
        raise TomlReadError("more than one value (a newline followed by another key or table)")
    return parsed["v"]


def apply_overlays(tree: Tree, files: Iterable[str]) -> Tree:
    for file in files:
        tree = load(file, kind="overlay", onto=tree)
    return tree


def apply_strings(tree: Tree, overrides: Iterable[str], *, kind: str = "cli") -> Tree:
    """Apply dotted override strings in order; all malformed ones are reported together."""
    problems: list[Problem] = []
    for text in overrides:
        source = Source(kind, detail=text)  # type: ignore[arg-type]
        match = _OVERRIDE.match(text.strip())
        if not match:
            problems.append(Problem(OverrideError, f"cannot read override {shown(repr(text))}", source=source,
                                    hint="write key=value (train.train_iters=100), +key=value or ~key"))
            continue
        op, key, raw = match.group("op"), match.group("key"), match.group("value")
        path: Path = tuple(key.split("."))
        if len(path) > MAX_NESTING:
            problems.append(_too_deep(key, source))
            continue
        if op == "~":
            if raw is not None:
                problems.append(Problem(OverrideError, f"`~{key}` unsets a key and takes no value", key=key, source=source,
                                        hint=f"write ~{key}"))
                continue
            if not tree.has(path) and field_of(path) is None:
                problems.append(_unknown_key(key, source, "~"))
                continue
            tree = unset(tree, path)
            continue
        if raw is None:
            problems.append(Problem(OverrideError, f"override {text!r} has no value", key=key, source=source,
                                    hint=f"write {key}=VALUE, or ~{key} to reset it to its default"))
            continue
        try:
            value = parse_value(raw)
        except TomlReadError as exc:
            problems.append(Problem(OverrideError, f"value {shown(repr(raw))} is not a TOML value ({exc})", key=key,
                                    source=source, hint='quote strings with spaces: key="a b"; lists: key=["a","b"]'))
            continue
        free_entry = _is_free_table_entry(path)
        if op != "+" and not tree.has(path) and free_entry:
            problems.append(Problem(OverrideError, f"`{key}` is not in this recipe", key=key, source=source,
                                    hint=f"add a new entry with +{key}={raw}"))
            continue
        if free_entry and isinstance(value, (int, float, bool)) and _takes_strings(path):
            value = raw.strip()  # +launch.env.NCCL_IB_DISABLE=1: environment values are text
        tree = set_leaf(tree, path, value, source)
    if problems:
        raise RecipeError.of(problems)
    return tree


def _too_deep(key: str, source: Source) -> Problem:
    return Problem(OverrideError, f"key has {key.count('.') + 1} parts; recipe keys are at most {MAX_NESTING} deep",
                   key=key, source=source, hint="`recipec schema` lists every key")


def _unknown_key(key: str, source: Source, op: str) -> Problem:
    from .structure import all_leaf_paths

    known = [".".join(p) for p in all_leaf_paths()]
    hint = did_you_mean(key[:200], known)
    hint = f"{hint[:-1]} (write {op}{hint.split('`')[1]})?" if hint else "`recipec schema` lists every key"
    return Problem(OverrideError, f"`{key}` is not a key of the schema or of this recipe", key=key, source=source,
                   hint=hint)


def _takes_strings(path: Path) -> bool:
    import typing

    field = field_of(path)
    return field is not None and typing.get_args(field.type)[1:] == (str,)


def _is_free_table_entry(path: Path) -> bool:
    parent = field_of(path[:-1]) if len(path) > 1 else None
    return parent is not None and field_of(path) is parent


def apply_python(tree: Tree, changes: Mapping[str, Any]) -> Tree:
    """Python-side overrides: `{"train": {"train_iters": 20}}`, `{"train.train_iters": 20}`
    or a whole section object (`{"model": ModelConfig(...)}`), which replaces that table."""
    for key, value in changes.items():
        path: Path = tuple(key.split("."))
        source = Source("python", detail=key)
        deep = too_deep(value, MAX_NESTING - len(path))
        if len(path) > MAX_NESTING or deep is not None:
            raise RecipeError.of([_too_deep(".".join((*path, *(deep or ()))), source)])
        if attrs.has(type(value)):
            table = {k: v for k, v in _asdict(value).items() if v is not None}
            tree = unset(tree, path)
            tree = set_leaf(tree, path, table, source)
        elif isinstance(value, Mapping):
            for sub, sub_value in value.items():
                tree = apply_python(tree, {f"{key}.{sub}": sub_value})
        else:
            tree = set_leaf(tree, path, _plain(value), source)
    return tree


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: _plain(v) for k, v in attrs.asdict(obj, recurse=False).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
