"""Reading a compiled artifact: the runtime's only input.

`plan.json` holds the resolved config, the plan and a fingerprint over both.
The runtime rebuilds the frozen RecipeConfig through the compiler's own schema
check, recomputes the fingerprint, and refuses an artifact that was edited
after `recipec build` (or written by another artifact version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from recipec.compiler.api import ARTIFACT_VERSION
from recipec.compiler.errors import ArtifactError, RecipeError
from recipec.compiler.render import config_to_dict, fingerprint
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.structure import structure
from recipec.compiler.tree import Tree


@attrs.frozen
class Artifact:
    directory: Path
    config: RecipeConfig
    plan: dict[str, Any]
    fingerprint: str


def load_artifact(directory: str | Path) -> Artifact:
    """Load and verify BUILD_DIR/plan.json (a path to the file itself also works)."""
    path = Path(directory)
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise ArtifactError(f"no compiled artifact at {path}; run `recipec build RECIPE -o {path.parent}` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable plan.json ({exc}); rebuild it with `recipec build`") from None
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
    tree = Tree({k: _strip_none(v) for k, v in config_data.items() if v is not None})
    config, problems = structure(tree)
    if config is None:
        raise RecipeError.of(problems)
    if config_to_dict(config) != config_data:
        raise ArtifactError(f"{path} does not round-trip through this recipec's schema; rebuild it")
    return Artifact(path.parent, config, plan, actual)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    return value
