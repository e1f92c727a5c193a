"""JSON Schema of the recipe format, generated from the attrs classes.

TOML editors (Taplo, Even Better TOML) use it to complete keys and flag wrong
types; the schema is the same single source of truth the compiler checks with.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs

from .schema import RecipeConfig
from .schema._fields import is_free_table


def _type(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type(args[0]) if len(args) == 1 else {"anyOf": [_type(a) for a in args]}
    if origin is tuple:
        return {"type": "array", "items": _type(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type(typing.get_args(tp)[1])}
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


def _field(field: attrs.Attribute) -> dict[str, Any]:
    out = _type(field.type)
    meta = field.metadata
    out["description"] = meta.get("help", "")
    if "choices" in meta:
        out["enum"] = list(meta["choices"])
    if "min" in meta:
        out["minimum"] = meta["min"]
    if "max" in meta:
        out["maximum"] = meta["max"]
    default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[attr-defined]
    if default is not None and not is_free_table(field.type):
        out["default"] = list(default) if isinstance(default, tuple) else default
    return out


def recipe_json_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {
        "extends": {"description": "Parent recipe(s), merged left to right before this file.",
                    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    }
    for field in attrs.fields(RecipeConfig):
        if field.metadata.get("section"):
            cls = field.type
            properties[field.name] = {
                "type": "object",
                "description": (cls.__doc__ or "").strip().splitlines()[0],
                "properties": {f.name: _field(f) for f in attrs.fields(cls)}
                | {"_replace": {"type": "boolean", "description": "Replace the parent's table wholesale."}},
                "additionalProperties": False,
            }
        else:
            properties[field.name] = _field(field)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "recipec recipe",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
