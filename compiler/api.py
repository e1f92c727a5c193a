"""`build()`: the one path from a recipe (plus overrides) to a compiled artifact.

The CLI, `recipec launch` and Python users all go through here, so a recipe
compiles the same way everywhere:

    load -> overlays -> dotted overrides -> Python overrides
         -> structure -> validate -> derive -> plan -> fingerprint
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path as FsPath
from typing import Any

import attrs

from .errors import Problem, RecipeError, UnknownKeyError
from .executors import executor_for, script_names
from .loader import load, resolve
from .overrides import apply_overlays, apply_python, apply_strings
from .plan import Plan, make_plan, plan_to_dict
from .render import (
    config_to_dict,
    fingerprint,
    origin_of,
    resolved_toml,
    section_lines,
    toml_key,
    toml_value,
)
from .schema import RecipeConfig, derive
from .schema._fields import is_free_table
from .sources import Source, display_path
from .structure import field_of, key_hint, structure
from .text import shown
from .tree import Tree, set_leaf
from .validate import validate

ARTIFACT_VERSION = 1


@attrs.frozen
class Compiled:
    """A validated recipe: frozen config, plan, provenance and fingerprint."""

    config: RecipeConfig
    plan: Plan
    tree: Tree
    warnings: tuple[str, ...]
    fingerprint: str
    artifact_dir: str

    @property
    def name(self) -> str:
        return self.config.name

    def override(self, *overrides: str, **python: Any) -> Compiled:
        """Recompile with more dotted overrides and/or Python values; re-validates everything."""
        tree = apply_strings(self.tree, overrides, kind="python") if overrides else self.tree
        if python:
            tree = apply_python(tree, python)
        return compile_tree(tree, artifact_dir=self.artifact_dir)

    def explain(self, key: str) -> str:
        """Value, provenance chain, default and help of one dotted key (values written as TOML)."""
        path = tuple(key.split("."))
        field = field_of(path)
        if field is None:
            raise RecipeError.of([Problem(UnknownKeyError, f"no key `{key}` in the schema", key=key,
                                          hint=key_hint(path))])
        if field.metadata.get("section"):
            return "\n".join(section_lines(self.config, self.tree, key))
        value: Any = self.config
        for part in path[:2]:
            value = getattr(value, part)
        help_line = f"  help:    {field.metadata.get('help', '')}"
        if len(path) == 3:  # an entry of a free table such as launch.env
            table, name = ".".join(path[:2]), path[2]
            if name not in value:
                return "\n".join([
                    f"{key} is unset: [{table}] has no entry {shown(name)}",
                    (f"  set it:  +{key}=VALUE on the command line, or {toml_key(name)} = \"VALUE\" under "
                     f"[{table}] in the recipe or an -f overlay"),
                    help_line,
                ])
            return "\n".join([f"{key} = {toml_value(value[name])}",
                              f"  set by:  {origin_of(path, value[name], self.tree)}", help_line])
        if is_free_table(field.type) and value:
            origin = "; ".join(f"{toml_key(k)}: {origin_of((*path, k), v, self.tree)}" for k, v in value.items())
        else:
            origin = origin_of(path, value, self.tree, field)
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[attr-defined]
        lines = [
            f"{key} = {_toml_or_unset(value)}",
            f"  set by:  {origin}",
            f"  default: {_toml_or_unset(default)}",
            help_line,
        ]
        if field.metadata.get("choices"):
            lines.append(f"  allowed: {', '.join(map(toml_value, field.metadata['choices']))}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """plan.json: what the runtime reads (it never parses TOML)."""
        return json.dumps(
            {
                "artifact_version": ARTIFACT_VERSION,
                "fingerprint": self.fingerprint,
                "config": config_to_dict(self.config),
                "plan": plan_to_dict(self.plan),
                "warnings": list(self.warnings),
            },
            indent=2,
            sort_keys=True,
        ) + "\n"

    def to_toml(self) -> str:
        return resolved_toml(self.config, self.tree, header=f"recipec resolved recipe {self.name}\nfingerprint {self.fingerprint}")

    def write(self, out_dir: str | FsPath | None = None, *, python: str | None = None) -> FsPath:
        """Write resolved.toml, plan.json and the executor's scripts into the build directory.

        The executor (`launch.executor`) says which scripts; another executor's stale ones are
        removed, so a job script never outlives its recipe. `python` is the interpreter the
        scripts run on the nodes (None: `python` / `torchrun` from PATH).
        """
        directory = FsPath(out_dir or self.artifact_dir)
        scripts = executor_for(self.config.launch.executor).scripts(self, python)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolved.toml").write_text(self.to_toml())
        (directory / "plan.json").write_text(self.to_json())
        for stale in script_names() - {s.name for s in scripts}:
            (directory / stale).unlink(missing_ok=True)
        for script in scripts:
            path = directory / script.name
            path.write_text(script.text)
            path.chmod(0o755 if script.executable else 0o644)
        return directory


def _toml_or_unset(value: Any) -> str:
    return "(unset)" if value is None else toml_value(value)


def build(
    recipe: str | FsPath,
    overrides: Sequence[str] = (),
    *,
    overlays: Sequence[str] = (),
    python: Mapping[str, Any] | None = None,
    artifact_dir: str | None = None,
) -> Compiled:
    """Compile a recipe file or bundled name; raises RecipeError on any user mistake."""
    if isinstance(overrides, str):  # build(r, "a=1") means one override, not one per character
        overrides = [overrides]
    if isinstance(overlays, (str, FsPath)):
        overlays = [str(overlays)]
    path = resolve(recipe)
    tree = load(path)
    if not tree.data:
        raise RecipeError.of([Problem(RecipeError, f"{display_path(path)} is empty: there is nothing to compile",
                                      source=Source("file", display_path(path), 1),
                                      hint='start from a bundled recipe: extends = "llama3_8b"')])
    if not _set_in(tree, ("name",), path):
        tree = set_leaf(tree, ("name",), path.stem, Source("derived", detail="recipe file name"))
    tree = apply_overlays(tree, overlays)
    tree = apply_strings(tree, overrides)
    if python:
        tree = apply_python(tree, python)
    return compile_tree(tree, artifact_dir=artifact_dir)


def compile_for_hf(recipe: str | FsPath | None, overrides: Sequence[str] = (), *, overlays: Sequence[str] = (),
                   hf_dir: str | FsPath | None = None) -> Compiled:
    """The recipe a weight conversion (`recipec convert ...`) works with: `recipe` (+overrides and
    overlays) like `build`, or without one, the recipe `recipec import-hf` makes for `hf_dir` (so its
    precision.dtype is the weights' own and HF -> mcore -> HF gives back the same bits).

    The one place a conversion's recipe is compiled: the CLI hands this to the runtime's convert
    commands (compiler/cli.py RUNTIME_COMMANDS), which never call `build` themselves."""
    if recipe is None:
        if hf_dir is None:
            raise RecipeError.of([Problem(RecipeError, "--recipe is required (the model's shape comes from it)",
                                          hint="pass --recipe R.toml, e.g. the one `recipec import-hf` wrote")])
        import tempfile

        from .hf_import import recipe_from_hf

        with tempfile.TemporaryDirectory() as tmp:
            path = FsPath(tmp) / "imported.toml"
            path.write_text(recipe_from_hf(str(hf_dir), name="imported"), encoding="utf-8")
            return build(path, tuple(overrides), overlays=tuple(overlays))
    return build(recipe, tuple(overrides), overlays=tuple(overlays))


def _set_in(tree: Tree, path: tuple[str, ...], file: FsPath) -> bool:
    """Whether the top recipe file itself set `path` (parents' names are not inherited)."""
    source = tree.source(path)
    return source is not None and source.file == display_path(file)


def compile_tree(tree: Tree, *, artifact_dir: str | None = None) -> Compiled:
    raw, problems = structure(tree)
    if raw is None:
        raise RecipeError.of(problems)
    findings = validate(raw, tree)
    if findings.errors:
        raise RecipeError.of(findings.errors)
    config = derive(raw)
    artifact = artifact_dir or f"build/{config.name}"
    plan = make_plan(config, tree, artifact)
    digest = fingerprint(config_to_dict(config), plan_to_dict(plan))
    return Compiled(config, plan, tree, findings.warnings, digest, artifact)


def from_config(config: RecipeConfig, *, artifact_dir: str | None = None) -> Compiled:
    """Compile a RecipeConfig made or evolved in Python (attrs.evolve); re-runs every check."""
    return compile_tree(apply_python(Tree(), {
        f.name: getattr(config, f.name) for f in attrs.fields(RecipeConfig)
    }), artifact_dir=artifact_dir)
