"""Reading recipe files: TOML parsing, `extends` resolution and merging.

A name in `extends` resolves relative to the file that names it, then in the
bundled library (`recipes_toml/`), with `.toml` optional. Parents merge left to
right, then the file itself.

Recipes are `.toml` files and nothing else: a name that finds another file (or a
`.toml` link to one) is refused before the file is opened, so `extends =
"/etc/passwd"` can never echo a line of it. An `extends` chain is at most
`MAX_EXTENDS_DEPTH` files deep and one recipe loads at most `MAX_LOADS` files, so
a generated or looping chain ends in a clear error, not a RecursionError or a hang.
"""

from __future__ import annotations

import difflib
import errno
import os
import stat
from importlib import resources
from pathlib import Path as FsPath
from typing import Any

import attrs

from .errors import (
    CyclicExtendsError,
    ExtendsLimitError,
    Problem,
    RecipeNotFoundError,
    TomlSyntaxError,
    TypeMismatchError,
    did_you_mean,
)
from .sources import Source, SourceKind, display_path
from .text import shown
from .toml_lines import key_at, key_lines, line_of, starts_statement
from .toml_read import TomlReadError, loads
from .tree import Tree, leaves, merge

EXTENDS = "extends"
SUFFIX = ".toml"
MAX_EXTENDS_DEPTH = 64  # files in one chain; the bundled library needs 4
MAX_LOADS = 256  # files read for one recipe, counting a file each time it is reached; the library needs < 10
MAX_BYTES = 64 * 2**20  # a recipe of 400k keys is ~12 MiB


def library_dir() -> FsPath:
    """The bundled recipe library (works for editable and wheel installs)."""
    return FsPath(str(resources.files("recipec.recipes_toml")))


def bundled_recipes() -> list[FsPath]:
    """Every user-facing bundled recipe (files under `_`-prefixed folders are building blocks)."""
    root = library_dir()
    return sorted(p for p in root.rglob("*.toml") if not any(part.startswith("_") for part in p.relative_to(root).parts))


def _not_found(message: str, referrer: Source | None, hint: str | None = None) -> RecipeNotFoundError:
    return RecipeNotFoundError([Problem(RecipeNotFoundError, message, source=referrer, hint=hint)])


def _kind(path: FsPath, ref: str, referrer: Source | None) -> str | None:
    """'file', 'dir', 'other' or None (absent) for `path`, following links; a path the system
    cannot even look up (too long, no permission) is an error that says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        if exc.errno == errno.ENAMETOOLONG:
            raise _not_found(f"recipe {shown(ref)!r}: the path is too long for the file system",
                             referrer, "name a recipe file by a shorter path") from None
        raise _not_found(f"cannot look up {shown(str(path))}: {exc.strerror}", referrer) from None
    except ValueError:  # an embedded NUL byte
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def resolve(ref: str | FsPath, relative_to: FsPath | None = None, *, referrer: Source | None = None,
            overlay: bool = False) -> FsPath:
    """The `.toml` file `ref` names: a path, a path relative to `relative_to`, or a bundled name.
    `overlay`: `ref` is a `-f` overlay file, and a message says so."""
    ref = str(ref)
    if not ref.strip():
        if overlay:
            raise _not_found("overlay '' not found: -f names an empty path", referrer,
                             "-f takes a TOML file of overrides, e.g. -f overrides.toml")
        raise _not_found("recipe '' not found: the recipe name is empty", referrer,
                         "name a recipe file or a bundled recipe, e.g. llama3_8b")
    name = ref if ref.endswith(SUFFIX) else ref + SUFFIX
    roots = [relative_to] if relative_to is not None else [FsPath.cwd()]
    roots.append(library_dir())
    for root in roots:
        candidate = FsPath(name) if FsPath(name).is_absolute() else root / name
        if _kind(candidate, ref, referrer) == "file":
            return _checked(candidate, ref, referrer)
    for root in roots:
        plain = FsPath(ref) if FsPath(ref).is_absolute() else root / ref
        kind = _kind(plain, ref, referrer)
        if kind == "dir":
            what = f"-f {shown(ref)} is a directory, not an overlay" if overlay else \
                f"{shown(display_path(plain))} is a directory, not a recipe"
            raise _not_found(f"{what} file", referrer,
                             f"name a .toml file inside it, e.g. {shown(ref.rstrip('/'))}/<recipe>.toml")
        if kind is not None and ref.endswith(SUFFIX):
            raise _not_found(f"{shown(display_path(plain))} is not a regular file", referrer,
                             "a recipe is a plain .toml file (not a device, pipe or socket)")
        if kind is not None:
            raise _not_found(f"{shown(display_path(plain))} is not a recipe: recipes are {SUFFIX} files", referrer,
                             f"name a {SUFFIX} file (`extends = \"base\"` finds base{SUFFIX}); recipec reads no "
                             "other files")
    looked = ", ".join(display_path(r) for r in roots)
    if overlay:
        stem = FsPath(ref).name.removesuffix(SUFFIX)
        near = difflib.get_close_matches(stem[:200], _toml_stems_beside(FsPath(ref)), n=1, cutoff=0.6)
        hint = (f"did you mean -f {shown((FsPath(ref).parent / (near[0] + SUFFIX)).as_posix())}?" if near else
                "-f takes a TOML file of overrides, as a path relative to the working directory "
                "(e.g. -f overrides.toml); check the path")
        raise _not_found(f"overlay {shown(ref)!r} not found (-f {shown(ref)}; looked in {looked})", referrer, hint)
    known = [p.stem for p in bundled_recipes()]
    hint = did_you_mean(FsPath(ref).stem[:200], known) or "`recipec list` shows the bundled recipes"
    raise _not_found(f"recipe {shown(ref)!r} not found (looked in {looked})", referrer, hint)


def _toml_stems_beside(ref: FsPath, limit: int = 1000) -> list[str]:
    """Stems of (at most `limit`) .toml files in the directory `ref` points into, for a hint."""
    try:
        with os.scandir(ref.parent) as entries:
            names = []
            for entry in entries:
                if entry.name.endswith(SUFFIX):
                    names.append(entry.name.removesuffix(SUFFIX))
                    if len(names) >= limit:
                        break
            return names
    except (OSError, ValueError):
        return []


def _checked(candidate: FsPath, ref: str, referrer: Source | None) -> FsPath:
    """The real path of a found recipe, which must itself be a `.toml` file (not a link to another file)."""
    real = candidate.resolve()
    if real.suffix != SUFFIX:
        raise _not_found(f"{shown(candidate.name)} links to {shown(real.as_posix())}, which is not a {SUFFIX} file",
                         referrer, f"recipes and `extends` name {SUFFIX} files")
    return real


def _read(path: FsPath, shown_path: str) -> bytes:
    where = Source("file", shown_path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeNotFoundError([Problem(RecipeNotFoundError, f"cannot read {shown(shown_path)}: {exc.strerror}",
                                           hint="check the file's permissions")]) from None
    if len(raw) > MAX_BYTES:
        raise TomlSyntaxError([Problem(TomlSyntaxError, f"larger than {MAX_BYTES // 2**20} MiB: not a recipe",
                                       source=where, hint="a recipe is a small TOML file; split or shrink it")])
    return raw


def _parse(path: FsPath) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    shown_path = display_path(path)
    raw = _read(path, shown_path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw.splitlines()[line - 1] if line <= len(raw.splitlines()) else b""
        raise TomlSyntaxError([Problem(
            TomlSyntaxError, f"not UTF-8 text (byte {raw[exc.start]:#04x} at line {line})"
            + (f"\n   | {shown(bad.decode('utf-8', 'replace').strip())}" if bad else ""),
            key=".".join(key_at(raw.decode("utf-8", "replace"), line)) or None, source=Source("file", shown_path, line),
            hint="TOML files are UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")]) from None
    try:
        data = loads(text)
    except TomlReadError as exc:
        raise _syntax_error(text, exc, shown_path) from None
    return data, key_lines(text)


def _syntax_error(text: str, exc: TomlReadError, shown_path: str) -> TomlSyntaxError:
    line, message = exc.line, exc.message
    lines = text.splitlines()
    if exc.opened is not None and line:
        return _unclosed_error(lines, exc, shown_path)
    if exc.at_end:
        message += " at the end of the file"
    snippet = lines[line - 1].strip() if line and line <= len(lines) else ""
    key = exc.key or (key_at(text, line) if line else ())
    hint = "strings need quotes, tables are [name], keys are `key = value`"
    if "nested deeper" in message:
        hint = "a recipe nests a few tables deep ([section], a table of strings, a list); flatten the data"
    elif "digits" in message:
        hint = "write the number with at most 19 digits (TOML integers are 64-bit)"
    elif line and ("overwrite" in message or "declare" in message):
        first = key_lines("\n".join(lines[: line - 1])).get(key)
        hint = (f"`{shown('.'.join(key))}` is already set" + (f" on line {first}" if first else "") +
                " in this file: keep one (a table is written once: [name] or name.key, not both)")
    return TomlSyntaxError(
        [Problem(TomlSyntaxError, f"invalid TOML: {message}" + (f"\n   | {shown(snippet)}" if snippet else ""),
                 key=".".join(key) or None, source=Source("file", shown_path, line), hint=hint)]
    )


_CLOSERS = {"array": "]", "inline table": "}"}


def _unclosed_error(lines: list[str], exc: TomlReadError, shown_path: str) -> TomlSyntaxError:
    """An array, inline table or multi-line string still open where tomllib stopped: the message
    names the line it opened on (where the fix usually is) and the line where the error showed."""
    assert exc.opened is not None and exc.line is not None
    what, start = exc.opened
    line, message = exc.line, exc.message
    here = lines[line - 1] if line <= len(lines) else ""
    shown_lines, at = [start, line], start  # `at`: the line the message is filed under
    if what == "multi-line string":
        text = f"the multi-line string opened on line {start} is not closed" + (
            " (the file ends inside it)" if exc.at_end else f" ({message} on line {line})")
        hint = 'close it with the three quotes it opened with (""" or \'\'\')'
    elif what == "inline table" and start == line and not exc.at_end:
        text = f"the inline table opened on line {start} does not end on that line ({message})"
        hint = (f"an inline table {{ ... }} is one line in TOML: close it with `}}` on line {start}, "
                "or write a [table] with one key per line")
        shown_lines = [start, start + 1]
    else:
        closer = _CLOSERS[what]
        if exc.at_end or starts_statement(here):
            where = "before the file ends" if exc.at_end else f"before line {line}"
            text = f"the {what} opened on line {start} is not closed {where} ({message})"
        else:  # a mistake inside a well-formed multi-line array, e.g. a missing comma
            text, at = f"{message} on line {line}, inside the {what} opened on line {start}", line
        hint = (f"close the {what} with `{closer}`; items are separated by commas"
                + (" (an array may span lines)" if what == "array" else
                   " (an inline table is one line in TOML)"))
    numbered = [n for n in dict.fromkeys(shown_lines) if 0 < n <= len(lines) and lines[n - 1].strip()]
    snippet = "".join(f"\n   | {n}: {shown(lines[n - 1].strip())}" for n in numbered)
    return TomlSyntaxError([Problem(TomlSyntaxError, f"invalid TOML: {text}{snippet}", key=".".join(exc.key) or None,
                                    source=Source("file", shown_path, at), hint=hint)])


def _layer(data: dict[str, Any], lines: dict[tuple[str, ...], int], shown_path: str, kind: SourceKind) -> Tree:
    chains = {path: (Source(kind, shown_path, line_of(lines, path)),) for path, _ in leaves(data)}
    headers = {path: Source(kind, shown_path, line) for path, line in lines.items()
               if path not in chains and isinstance(_at(data, path), dict)}
    return Tree(data, chains, headers)


def _at(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


@attrs.define
class _Budget:
    """Files loaded so far for one recipe (a diamond of mixins is loaded once per path to it)."""

    loads: int = 0


def load(ref: str | FsPath, *, kind: SourceKind = "file", relative_to: FsPath | None = None,
         onto: Tree | None = None) -> Tree:
    """Load a recipe and everything it extends into one merged tree, merged onto `onto` (an
    overlay is merged straight onto the recipe, so its `_replace = true` tables replace)."""
    return _load(resolve(ref, relative_to, overlay=kind == "overlay"), kind, (), _Budget(), onto)


def _chain(paths: tuple[FsPath, ...]) -> str:
    """'a.toml -> b.toml -> c.toml', with the middle of a long chain left out."""
    names = [display_path(p) for p in paths]
    if len(names) > 7:
        names = names[:3] + [f"... ({len(names) - 6} more)"] + names[-3:]
    return " -> ".join(shown(n) for n in names)


def _load(path: FsPath, kind: SourceKind, stack: tuple[FsPath, ...], budget: _Budget,
          onto: Tree | None = None) -> Tree:
    shown_path = display_path(path)
    budget.loads += 1
    if len(stack) >= MAX_EXTENDS_DEPTH or budget.loads > MAX_LOADS:
        deep = len(stack) >= MAX_EXTENDS_DEPTH
        what = (f"is more than {MAX_EXTENDS_DEPTH} files deep" if deep
                else f"reaches more than {MAX_LOADS} files (counting each file every time it is extended)")
        raise ExtendsLimitError([Problem(
            ExtendsLimitError, f"the `extends` chain {what}: {_chain(stack + (path,))}", key=EXTENDS,
            source=Source("file", display_path(stack[-1])) if stack else None,
            hint="a recipe extends a base and a few mixins; a chain this long is generated by mistake: flatten it")])
    data, lines = _parse(path)
    parents = data.pop(EXTENDS, [])
    here = Source(kind, shown_path, lines.get((EXTENDS,)))
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise TypeMismatchError(
            [Problem(TypeMismatchError, f"`extends` must be a string or a list of strings, got {shown(repr(parents))}",
                     key=EXTENDS, source=here, hint='extends = "llama3_8b" or extends = ["base", "mixin"]')]
        )
    tree = onto if onto is not None else Tree()
    for parent in parents:
        try:
            parent_path = resolve(parent, path.parent, referrer=here)
        except RecipeNotFoundError as exc:
            chain = f"{_chain(stack + (path,))} -> {shown(parent)}"
            raise RecipeNotFoundError(
                [attrs.evolve(p, message=f"{p.message}; extends chain: {chain}") for p in exc.problems]
            ) from None
        if parent_path in stack + (path,):
            raise CyclicExtendsError(
                [Problem(CyclicExtendsError, f"`extends` forms a cycle: {_chain(stack + (path, parent_path))}",
                         key=EXTENDS, source=here,
                         hint=f"remove {shown(parent)!r} from this `extends` (or another link of the chain) "
                              "so the chain ends in a base recipe")]
            )
        tree = _load(parent_path, "file", stack + (path,), budget, onto=tree)
    return merge(tree, _layer(data, lines, shown_path, kind))
