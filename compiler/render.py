"""Writing compiled recipes: resolved TOML with provenance, canonical JSON, fingerprint.

Output is a pure function of the config (sorted, no timestamps), so building
twice gives byte-identical files and the fingerprint is stable.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import attrs

from .schema import RecipeConfig
from .sources import describe_chain
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
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def resolved_toml(config: RecipeConfig, tree: Tree, header: str = "") -> str:
    """Every field of the config, one per line, with where it came from as a comment."""
    lines = [f"# {line}" for line in header.splitlines()]
    for field in attrs.fields(RecipeConfig):
        if not field.metadata.get("section"):
            lines.append(_line((field.name,), getattr(config, field.name), tree))
    for field in attrs.fields(RecipeConfig):
        if field.metadata.get("section"):
            section = getattr(config, field.name)
            lines += ["", f"[{field.name}]"]
            for sub in attrs.fields(type(section)):
                lines.append(_line((field.name, sub.name), getattr(section, sub.name), tree, sub))
    return "\n".join(lines).lstrip("\n") + "\n"


def _line(path: tuple[str, ...], value: Any, tree: Tree, field: attrs.Attribute | None = None) -> str:
    chain = tree.chains.get(path)
    if chain:
        origin = describe_chain(chain)
    elif field is not None and field.metadata.get("derived") and value is not None:
        origin = f"derived: {field.metadata['derived']}"
    else:
        origin = "default"
    if value is None:
        return f"# {path[-1]} = (unset)  # {origin}"
    return f"{_key(path[-1])} = {toml_value(value)}  # {origin}"
