"""Reading a compiled artifact: the runtime's only input.

`plan.json` holds the resolved config, the plan and a fingerprint over both.
The runtime rebuilds the frozen RecipeConfig through the compiler's own schema
check, recomputes the fingerprint, and refuses an artifact that was edited
after `recipec build` (or written by another artifact version).

Everything in the file is treated as untrusted input: bytes that are not UTF-8, JSON that is
not an object, NaN/Infinity, nesting deeper than any artifact has, or plan fields of the wrong
type are ArtifactErrors that name the file and say to rebuild, never a traceback.

This is the runtime's one door to what the compiler decided: the plan comes back as the
compiler's own frozen `Plan` (compiler/plan.plan_from_dict), so the runtime reads attributes
(`artifact.plan.microbatches_per_step`), never string keys, and a field the compiler renames
breaks here, at load, instead of mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from recipec.compiler.api import ARTIFACT_VERSION
from recipec.compiler.errors import ArtifactError, RecipeError
from recipec.compiler.plan import Plan, plan_from_dict
from recipec.compiler.render import config_to_dict, fingerprint
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.structure import structure
from recipec.compiler.tree import Tree


@attrs.frozen
class Artifact:
    directory: Path
    config: RecipeConfig
    plan: Plan
    fingerprint: str


MAX_BYTES = 64 * 1024 * 1024  # a real plan.json is a few KB; anything this big is not one
MAX_DEPTH = 32  # a real plan.json nests 4 levels deep


def load_artifact(directory: str | Path) -> Artifact:
    """Load and verify BUILD_DIR/plan.json (a path to the file itself also works)."""
    path = Path(directory)
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise ArtifactError(f"no compiled artifact at {path}; run `recipec build RECIPE -o {path.parent}` first")
    data = read_plan_json(path)
    if data.get("artifact_version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path} has artifact version {data.get('artifact_version')!r}, this runtime reads "
                            f"{ARTIFACT_VERSION}; rebuild it with `recipec build`")
    config_data, plan = data.get("config"), data.get("plan")
    if not isinstance(config_data, dict) or not isinstance(plan, dict):
        raise ArtifactError(f"{path} lacks its config or plan; rebuild it with `recipec build`")
    stored = data.get("fingerprint")
    actual = fingerprint(config_data, plan)
    if stored != actual:
        raise ArtifactError(
            f"{path} was modified after it was compiled: fingerprint {stored} does not match its content "
            f"({actual}); edit the recipe and run `recipec build` again instead of editing plan.json"
        )
    typed = plan_from_dict(plan, str(path))
    tree = Tree({k: _strip_none(v) for k, v in config_data.items() if v is not None})
    config, problems = structure(tree)
    if config is None:
        raise RecipeError.of(problems)
    if config_to_dict(config) != config_data:
        raise ArtifactError(f"{path} does not round-trip through this recipec's schema; rebuild it")
    return Artifact(path.parent, config, typed, actual)


def read_plan_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or an ArtifactError saying what is wrong with the file and where."""
    rebuild = "rebuild it with `recipec build`"
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ArtifactError(f"{path} is {size:,} bytes, not a plan.json (those are a few KB); {rebuild}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}; {rebuild}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {rebuild}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            f"{rebuild}") from None
    except ValueError as exc:  # NaN / Infinity, refused by _no_constant
        raise ArtifactError(f"{path}: {exc}; {rebuild}") from None
    except RecursionError:
        raise ArtifactError(f"{path} nests JSON deeper than Python can read; {rebuild}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not the object `recipec build` "
                            f"writes; {rebuild}")
    if _depth(data) > MAX_DEPTH:
        raise ArtifactError(f"{path} nests JSON more than {MAX_DEPTH} levels deep (a plan.json nests a few); {rebuild}")
    return data


def _no_constant(name: str) -> Any:
    """json's hook for NaN/Infinity: the compiler never writes them (its JSON is strict)."""
    raise ValueError(f"{name} is not a value `recipec build` writes (plan.json is strict JSON)")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (so a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    return value
