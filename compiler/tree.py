"""Recipe trees: nested TOML data plus the provenance chain of every leaf.

A `Tree` is what loading, merging and overriding work on before the schema
sees anything. Merging is deep: tables merge key by key, scalars and arrays
replace. A table holding `_replace = true` replaces its parent's table
wholesale instead (the one spelling for "swap the whole model").
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import Problem, TypeMismatchError
from .sources import Source

Path = tuple[str, ...]
REPLACE_KEY = "_replace"


def dotted(path: Path) -> str:
    return ".".join(path)


@attrs.frozen
class Tree:
    """Nested data and, per leaf path, the sources that set it (oldest first)."""

    data: dict[str, Any] = attrs.field(factory=dict)
    chains: dict[Path, tuple[Source, ...]] = attrs.field(factory=dict)
    # Where each table was opened in a file (`[name]` header, or `name = { ... }`; the last file to
    # open it wins). Leaves carry the provenance; this only lets a message about a whole table
    # (an unknown `[modle]`) name its header line.
    headers: dict[Path, Source] = attrs.field(factory=dict)

    def get(self, path: Path, default: Any = None) -> Any:
        node: Any = self.data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def has(self, path: Path) -> bool:
        sentinel = object()
        return self.get(path, sentinel) is not sentinel

    def source(self, path: Path) -> Source | None:
        """The newest source of `path`, of the nearest enclosing leaf, or else of the first
        leaf below it (a table such as `[model.parallel]` has no chain of its own)."""
        for end in range(len(path), 0, -1):
            chain = self.chains.get(path[:end])
            if chain:
                return chain[-1]
        below = [chain[-1] for p, chain in self.chains.items() if chain and p[: len(path)] == path]
        if below:
            newest = [s for s in below if s.file == below[-1].file and s.kind == below[-1].kind]
            return min(newest, key=lambda s: s.line if s.line is not None else 0)
        return None

    def header_source(self, path: Path) -> Source | None:
        """Where the table `path` was opened (`[modle]`, the line of its header), when the same file
        set the keys below it; else `source(path)`. For messages about a whole table."""
        source = self.source(path)
        header = self.headers.get(path)
        if header is not None and (source is None or (
                (header.kind, header.file) == (source.kind, source.file)
                and (header.line or 0) <= (source.line or 0))):
            return header
        return source


def leaves(data: dict[str, Any], prefix: Path = ()) -> list[tuple[Path, Any]]:
    out: list[tuple[Path, Any]] = []
    for key, value in data.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            out.extend(leaves(value, path))
        else:
            out.append((path, value))
    return out


def merge(base: Tree, layer: Tree) -> Tree:
    """Deep-merge `layer` over `base`, extending each leaf's provenance chain."""
    data = _copy(base.data)
    chains = dict(base.chains)
    _merge_into(data, layer.data, (), chains, layer.chains)
    return Tree(data, chains, {**base.headers, **layer.headers} if layer.headers else base.headers)


def _merge_into(
    dst: dict[str, Any],
    src: dict[str, Any],
    prefix: Path,
    chains: dict[Path, tuple[Source, ...]],
    src_chains: dict[Path, tuple[Source, ...]],
) -> None:
    for key, value in src.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            if not isinstance(value.get(REPLACE_KEY, False), bool):
                flag = path + (REPLACE_KEY,)
                raise TypeMismatchError([Problem(
                    TypeMismatchError, f"`{REPLACE_KEY}` must be true or false, got {value[REPLACE_KEY]!r}",
                    key=dotted(flag), source=(src_chains.get(flag) or (None,))[-1],
                    hint=f"write {REPLACE_KEY} = true to replace the parent's [{dotted(path)}] wholesale")])
            replace = value.get(REPLACE_KEY) is True
            body = {k: v for k, v in value.items() if k != REPLACE_KEY}
            if replace or not isinstance(dst.get(key), dict):
                _drop_chains(chains, path, dst.get(key))
                dst[key] = {}
            _merge_into(dst[key], body, path, chains, src_chains)
            if not body:
                chains[path] = chains.get(path, ()) + src_chains.get(path, ())
        else:
            _drop_chains(chains, path, dst.get(key), keep_self=True)
            dst[key] = value
            chains[path] = chains.get(path, ()) + src_chains.get(path, ())


def _drop_chains(chains: dict[Path, tuple[Source, ...]], path: Path, old: Any, keep_self: bool = False) -> None:
    """Forget the provenance of `path` and of everything below it, found by walking the value being
    replaced (`old`): chains only ever hold paths of the tree, so this costs the size of that
    subtree, not of the whole recipe, and merging stays linear in the number of keys."""
    if not keep_self:
        chains.pop(path, None)
    if isinstance(old, dict):
        stack = [(path, old)]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                below = prefix + (key,)
                chains.pop(below, None)
                if isinstance(value, dict):
                    stack.append((below, value))


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def set_leaf(tree: Tree, path: Path, value: Any, source: Source) -> Tree:
    """A new tree with `path` set to `value` (tables created as needed)."""
    layer: dict[str, Any] = {}
    node = layer
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    chains = {p: (source,) for p, _ in leaves({path[-1]: value}, path[:-1])} if isinstance(value, dict) else {path: (source,)}
    return merge(tree, Tree(layer, chains))


def unset(tree: Tree, path: Path) -> Tree:
    """A new tree without `path`, so the schema default applies again."""
    data = _copy(tree.data)
    node: Any = data
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return tree
    if isinstance(node, dict):
        node.pop(path[-1], None)
    chains = {p: c for p, c in tree.chains.items() if p[: len(path)] != path}
    return Tree(data, chains, tree.headers)
