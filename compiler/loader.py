"""Reading recipe files: TOML parsing, `extends` resolution and merging.

A name in `extends` resolves relative to the file that names it, then in the
bundled library (`recipes_toml/`), with `.toml` optional. Parents merge left to
right, then the file itself. Each file is read once per process.
"""

from __future__ import annotations

import re
import tomllib

from importlib import resources
from pathlib import Path as FsPath
from typing import Any

import attrs

from .errors import CyclicExtendsError, Problem, RecipeNotFoundError, TomlSyntaxError, TypeMismatchError, did_you_mean
from .sources import Source, SourceKind, display_path
from .toml_lines import key_at, key_lines, line_of
from .tree import Tree, leaves, merge

EXTENDS = "extends"


def library_dir() -> FsPath:
    """The bundled recipe library (works for editable and wheel installs)."""
    return FsPath(str(resources.files("recipec.recipes_toml")))


def bundled_recipes() -> list[FsPath]:
    """Every user-facing bundled recipe (files under `_`-prefixed folders are building blocks)."""
    root = library_dir()
    return sorted(p for p in root.rglob("*.toml") if not any(part.startswith("_") for part in p.relative_to(root).parts))


def resolve(ref: str | FsPath, relative_to: FsPath | None = None, *, referrer: Source | None = None) -> FsPath:
    """The file `ref` names: a path, a path relative to `relative_to`, or a bundled name."""
    ref = str(ref)
    if not ref.strip():
        raise RecipeNotFoundError([Problem(RecipeNotFoundError, "recipe '' not found: the recipe name is empty",
                                           source=referrer, hint="name a recipe file or a bundled recipe, e.g. llama3_8b")])
    names = [ref] if ref.endswith(".toml") else [ref + ".toml", ref]
    roots = [relative_to] if relative_to is not None else [FsPath.cwd()]
    roots.append(library_dir())
    for root in roots:
        for name in names:
            candidate = FsPath(name) if FsPath(name).is_absolute() else root / name
            if candidate.is_file():
                return candidate.resolve()
    for root in roots:
        for name in names:
            candidate = FsPath(name) if FsPath(name).is_absolute() else root / name
            if candidate.is_dir() and name == ref:
                raise RecipeNotFoundError([Problem(
                    RecipeNotFoundError, f"{display_path(candidate)} is a directory, not a recipe file",
                    source=referrer, hint=f"name a .toml file inside it, e.g. {ref.rstrip('/')}/<recipe>.toml")])
    known = [p.stem for p in bundled_recipes()]
    hint = did_you_mean(FsPath(ref).stem, known) or "`recipec list` shows the bundled recipes"
    looked = ", ".join(display_path(r) for r in roots)
    raise RecipeNotFoundError(
        [Problem(RecipeNotFoundError, f"recipe {ref!r} not found (looked in {looked})", source=referrer, hint=hint)]
    )


_LINE_COL = re.compile(r"\(at line (\d+), column (\d+)\)")


def _parse(path: FsPath) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    shown = display_path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeNotFoundError([Problem(RecipeNotFoundError, f"cannot read {shown}: {exc.strerror}",
                                           source=Source("file", shown))]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw.splitlines()[line - 1] if line <= len(raw.splitlines()) else b""
        raise TomlSyntaxError([Problem(
            TomlSyntaxError, f"not UTF-8 text (byte {raw[exc.start]:#04x} at line {line})"
            + (f"\n   | {bad.decode('utf-8', 'replace').strip()}" if bad else ""),
            key=".".join(key_at(raw.decode("utf-8", "replace"), line)) or None, source=Source("file", shown, line),
            hint="TOML files are UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _LINE_COL.search(str(exc))
        line = int(match.group(1)) if match else None
        message = _LINE_COL.sub("", str(exc)).strip()
        snippet = text.splitlines()[line - 1].strip() if line and line <= len(text.splitlines()) else ""
        key = key_at(text, line) if line else ()
        hint = "strings need quotes, tables are [name], keys are `key = value`"
        if "overwrite" in message or "declare" in message:
            first = key_lines("\n".join(text.splitlines()[: line - 1])).get(key) if line else None
            hint = (f"`{'.'.join(key)}` is already set" + (f" on line {first}" if first else "") +
                    " in this file: keep one (a table is written once: [name] or name.key, not both)")
        raise TomlSyntaxError(
            [Problem(TomlSyntaxError, f"invalid TOML: {message}" + (f"\n   | {snippet}" if snippet else ""),
                     key=".".join(key) or None, source=Source("file", shown, line), hint=hint)]
        ) from None
    return data, key_lines(text)


def _layer(data: dict[str, Any], lines: dict[tuple[str, ...], int], shown: str, kind: SourceKind) -> Tree:
    chains = {path: (Source(kind, shown, line_of(lines, path)),) for path, _ in leaves(data)}
    return Tree(data, chains)


def load(ref: str | FsPath, *, kind: SourceKind = "file", relative_to: FsPath | None = None,
         onto: Tree | None = None) -> Tree:
    """Load a recipe and everything it extends into one merged tree, merged onto `onto` (an
    overlay is merged straight onto the recipe, so its `_replace = true` tables replace)."""
    return _load(resolve(ref, relative_to), kind, (), onto)


def _load(path: FsPath, kind: SourceKind, stack: tuple[FsPath, ...], onto: Tree | None = None) -> Tree:
    shown = display_path(path)
    if path in stack:
        chain = " -> ".join(display_path(p) for p in stack + (path,))
        raise CyclicExtendsError(
            [Problem(CyclicExtendsError, f"`extends` forms a cycle: {chain}", key=EXTENDS,
                     source=Source("file", display_path(stack[-1])),
                     hint="remove one of these `extends` so the chain ends in a base recipe")]
        )
    data, lines = _parse(path)
    parents = data.pop(EXTENDS, [])
    here = Source(kind, shown, lines.get((EXTENDS,)))
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise TypeMismatchError(
            [Problem(TypeMismatchError, f"`extends` must be a string or a list of strings, got {parents!r}",
                     key=EXTENDS, source=here, hint='extends = "llama3_8b" or extends = ["base", "mixin"]')]
        )
    tree = onto if onto is not None else Tree()
    for parent in parents:
        try:
            parent_path = resolve(parent, path.parent, referrer=here)
        except RecipeNotFoundError as exc:
            chain = " -> ".join(display_path(p) for p in stack + (path,))
            raise RecipeNotFoundError(
                [attrs.evolve(p, message=f"{p.message}; extends chain: {chain} -> {parent}") for p in exc.problems]
            ) from None
        if parent_path in stack + (path,):
            chain = " -> ".join(display_path(p) for p in stack + (path, parent_path))
            raise CyclicExtendsError(
                [Problem(CyclicExtendsError, f"`extends` forms a cycle: {chain}", key=EXTENDS, source=here,
                         hint=f"remove {parent!r} from this `extends` (or another link of the chain) "
                              "so the chain ends in a base recipe")]
            )
        tree = _load(parent_path, "file", stack + (path,), onto=tree)
    return merge(tree, _layer(data, lines, shown, kind))
