"""From a merged tree to frozen attrs objects: unknown keys and wrong types.

Every key is checked against the attrs classes in `schema/`; an unknown key
gets a "did you mean" (and, when the key belongs to another section, the
section it lives in); a wrong value names the expected type. All problems of
a recipe are collected before anything is raised.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import attrs

from .errors import (
    MAX_SHOWN,
    Problem,
    TypeMismatchError,
    UnknownKeyError,
    closest,
    did_you_mean,
)
from .schema import RecipeConfig
from .schema._fields import check_value, is_free_table
from .toml_read import TomlReadError, loads
from .tree import Path, Tree, dotted

TOP_LEVEL_ONLY = ("name", "description")
INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


def representable(value: Any) -> str | None:
    """Why a value cannot be compiled at all (TOML 1.0: ints are 64-bit; the artifact is JSON,
    which has no inf/nan; text must be Unicode that UTF-8 and TOML can write), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        return f"integer {value} does not fit in 64 bits (TOML integers are 64-bit)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if isinstance(value, str) and _SURROGATE.search(value):
        return f"{value!r} is not valid Unicode text (it holds a lone surrogate, e.g. from bytes that are not UTF-8)"
    if isinstance(value, (list, tuple)):
        return next((r for r in map(representable, value) if r), None)
    if isinstance(value, dict):
        return next((r for r in map(representable, [*value, *value.values()]) if r), None)
    return None


def section_classes() -> dict[str, type]:
    return {f.name: f.type for f in attrs.fields(RecipeConfig) if f.metadata.get("section")}


def field_of(path: Path) -> attrs.Attribute | None:
    """The schema field a dotted path names, if any ('model.num_layers')."""
    cls: type = RecipeConfig
    attribute = None
    for i, key in enumerate(path):
        if attribute is not None and is_free_table(attribute.type):
            return attribute if i == len(path) - 1 else None
        fields = {f.name: f for f in attrs.fields(cls)}
        if key not in fields:
            return None
        attribute = fields[key]
        if attribute.metadata.get("section"):
            cls = attribute.type
        elif i != len(path) - 1 and not is_free_table(attribute.type):
            return None
    return attribute


def all_leaf_paths() -> list[Path]:
    """Every settable schema key, for hints and `recipec schema`."""
    return list(_leaf_paths())


@functools.cache
def _leaf_paths() -> tuple[Path, ...]:
    paths: list[Path] = [(name,) for name in TOP_LEVEL_ONLY]
    for section, cls in section_classes().items():
        paths += [(section, f.name) for f in attrs.fields(cls)]
    return tuple(paths)


def structure(tree: Tree) -> tuple[RecipeConfig | None, list[Problem]]:
    """Build the (not yet derived) RecipeConfig, or say everything wrong with the tree."""
    problems: list[Problem] = []
    kwargs: dict[str, Any] = {}
    sections = section_classes()
    for key, value in tree.data.items():
        path = (key,)
        if key in sections:
            if not isinstance(value, dict):
                hint = (f"write [{key}] (a table), not [[{key}]] (an array of tables)"
                        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
                        else f"write [{key}] and put its keys below it, or {key}.some_key = value")
                problems.append(_problem(TypeMismatchError, tree, path, f"`{key}` must be a table ([{key}]), got {value!r}",
                                         hint=hint))
                continue
            section, section_problems = _structure_section(tree, key, sections[key], value)
            problems += section_problems
            kwargs[key] = section
        elif key in TOP_LEVEL_ONLY:
            problem = representable(value) or check_value(attrs.fields_dict(RecipeConfig)[key], value)
            if problem:
                problems.append(_problem(TypeMismatchError, tree, path, problem))
            else:
                kwargs[key] = value
        else:
            problems.append(_unknown(tree, path, list(sections) + list(TOP_LEVEL_ONLY), len(problems) < MAX_SHOWN))
    if problems:
        return None, problems
    return RecipeConfig(**kwargs), []


def _structure_section(tree: Tree, name: str, cls: type, data: dict[str, Any]) -> tuple[Any, list[Problem]]:
    problems: list[Problem] = []
    fields = attrs.fields_dict(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = (name, key)
        attribute = fields.get(key)
        if attribute is None:
            problems.append(_unknown(tree, path, list(fields), len(problems) < MAX_SHOWN))
            continue
        problem = representable(value)
        if problem:
            problems.append(_problem(TypeMismatchError, tree, path, problem, hint="use a finite value in range"))
            continue
        problem = check_value(attribute, value)
        if problem:
            problems.append(_problem(TypeMismatchError, tree, path, problem, hint=_type_hint(attribute, value)))
            continue
        kwargs[key] = value
    if problems:
        return None, problems
    return cls(**kwargs), []


def _type_hint(attribute: attrs.Attribute, value: Any = None) -> str | None:
    choices = attribute.metadata.get("choices")
    limit = attribute.metadata.get("max")
    if limit is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
        return (f"the limit {limit:,} is far above any real model or run; a value past it is almost always "
                "a typo: an extra digit, or 1e308 for 1e-3")
    if choices:
        return "allowed: " + ", ".join(f'"{c}"' if isinstance(c, str) else repr(c) for c in choices)
    if is_free_table(attribute.type) and isinstance(value, dict):
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if any(isinstance(value[k], (dict, list)) for k in bad):
            return f"[{attribute.name}] holds NAME = \"value\" pairs, not nested tables or lists"
        if bad:
            return f'quote the value{"s" if len(bad) > 1 else ""}: ' + ", ".join(f'{k} = "{value[k]}"' for k in bad[:3])
    if isinstance(value, str) and value and representable(literal := _toml_literal(value)) is None \
            and not isinstance(literal, str) and check_value(attribute, literal) is None:
        return f"drop the quotes: {attribute.name} = {value}"
    return None


def _toml_literal(text: str) -> Any:
    try:
        return loads(f"v = {text}").get("v", text)
    except TomlReadError:
        return text


def _problem(kind: type, tree: Tree, path: Path, message: str, hint: str | None = None) -> Problem:
    return Problem(kind, message, key=dotted(path), source=tree.source(path), hint=hint)


def _unknown(tree: Tree, path: Path, siblings: list[str], hinted: bool = True) -> Problem:
    """An unknown key with a hint; past the problems a message shows (`hinted` false: a generated
    recipe with 100k unknown keys) the hint is left out, as the fuzzy match is the slow part."""
    key = path[-1]
    where = f"[{path[0]}]" if len(path) > 1 else "the top level"
    source = tree.header_source(path)  # an unknown table is named at its header line
    if not hinted:
        return Problem(UnknownKeyError, f"unknown key `{key}` in {where}", key=dotted(path), source=source)
    hint = did_you_mean(key[:200], siblings)
    homes = [p for p in all_leaf_paths() if p[-1] == key and p != path]
    if len(path) > 1 and key in section_classes():
        hint = f"[{key}] is a section of its own: write [{key}], not [{dotted(path)}]"
    elif homes:
        home = dotted(homes[0])
        hint = f"`{key}` lives in [{homes[0][0]}]: write `{home}`" if len(homes[0]) > 1 else f"`{key}` is a top-level key"
    elif hint is None:
        hint = f"known keys here: {', '.join(sorted(siblings))}"
    return Problem(UnknownKeyError, f"unknown key `{key}` in {where}", key=dotted(path), source=source, hint=hint)


def key_hint(path: Path) -> str:
    """How to fix a dotted key the schema does not have (`recipec explain`), as `build` would say
    it, but naming whole dotted keys: did you mean `model.num_layers`?, `x` lives in [section]."""
    sections = section_classes()
    head = path[0][:200]
    if len(path) == 1:
        match = closest(head, [*sections, *TOP_LEVEL_ONLY])
        homes = [p for p in all_leaf_paths() if p[-1] == head]
        if homes:
            return f"`{head}` lives in [{homes[0][0]}]: write `{dotted(homes[0])}`"
        return f"did you mean `{match}`?" if match else "`recipec schema` lists every key"
    if head not in sections:
        section = closest(head, sections)
        if section is not None and field_of((section, *path[1:])) is not None:
            return f"did you mean `{dotted((section, *path[1:]))}`?"
    elif len(path) == 2:
        key = path[1][:200]
        match = closest(key, [f.name for f in attrs.fields(sections[head])])
        homes = [p for p in all_leaf_paths() if p[-1] == key and p[0] != head]
        if match is not None:
            return f"did you mean `{head}.{match}`?"
        if homes:
            return f"`{key}` lives in [{homes[0][0]}]: write `{dotted(homes[0])}`"
    else:
        value = next((path[:end] for end in range(len(path) - 1, 1, -1) if field_of(path[:end]) is not None), None)
        if value is not None:
            return f"`{dotted(value)}` is a value, not a table: explain `{dotted(value)}`"
    match = closest(dotted(path)[:200], [dotted(p) for p in all_leaf_paths()])
    return f"did you mean `{match}`?" if match else "`recipec schema` lists every key"
