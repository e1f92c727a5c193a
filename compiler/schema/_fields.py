"""`option()`: one attrs field with its default, one-line help and checks.

The help text, the allowed values and the bounds live in the field's metadata,
so `recipec explain`, `recipec schema` and the docs read them from the class
itself, and the same check runs whether a value came from TOML or from Python.
"""

import types
import typing
from collections.abc import Sequence
from typing import Any

import attrs

NOTHING = attrs.NOTHING


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    derived: str | None = None,
) -> Any:
    """A keyword-only field; `derived` says how an unset (None) value is computed."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if min is not None:
        metadata["min"] = min
    if max is not None:
        metadata["max"] = max
    if derived is not None:
        metadata["derived"] = derived
    converter = None
    if isinstance(default, (list, tuple)):
        default = attrs.Factory(lambda d=tuple(default): d)
        converter = tuple
    elif isinstance(default, dict):
        default = attrs.Factory(lambda d=dict(default): dict(d))
        converter = dict
    return attrs.field(
        default=default,
        kw_only=True,
        metadata=metadata,
        validator=_validate_field,
        converter=converter,
    )


def _validate_field(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    problem = check_value(attribute, value)
    if problem is not None:
        raise ValueError(f"{type(instance).__name__}.{attribute.name}: {problem}")


def check_value(attribute: attrs.Attribute, value: Any) -> str | None:
    """Why `value` is not acceptable for this field, or None if it is."""
    problem = check_type(attribute.type, value)
    if problem is not None:
        return problem
    if value is None:
        return None
    meta = attribute.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        return f"{value!r} is not one of {allowed}"
    if "min" in meta and value < meta["min"]:
        return f"must be >= {meta['min']}, got {value!r}"
    if "max" in meta and value > meta["max"]:
        return f"must be <= {meta['max']}, got {value!r}"
    return None


def type_name(tp: Any) -> str:
    """How a type reads in an error message: 'an integer', 'a list of strings'."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_plural(typing.get_args(tp)[1])}"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, str(tp)
    )


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, str(tp))


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def check_type(tp: Any, value: Any) -> str | None:
    """Strict TOML-value type check (an int is a fine float; a bool is never an int)."""
    if _matches(tp, value):
        return None
    return f"expected {type_name(tp)}, got {_toml_type(value)} {value!r}"


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, (list, tuple)) and all(_matches(item, v) for v in value)
    if origin is dict:
        item = typing.get_args(tp)[1]
        return isinstance(value, dict) and all(
            isinstance(k, str) and _matches(item, v) for k, v in value.items()
        )
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def is_free_table(tp: Any) -> bool:
    """A dict-typed field: its TOML table is a value, not a section."""
    return typing.get_origin(tp) is dict
