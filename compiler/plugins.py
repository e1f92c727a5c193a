"""How plug-ins are found (design: Plug-ins): by the file names of their package, never a list.

A plug-in package (compiler/families, compiler/modes, runtime/families, runtime/modes) holds one
module per plug-in; modules whose names start with "_" are shared helpers, and `base` holds the
protocol. Nothing here imports torch: the runtime registries use it too.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any


def plugin_modules(path: Iterable[str]) -> list[str]:
    """Names of the plug-in modules in a package's `__path__`, sorted (not imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_") and m.name != "base")


def collect(package: str, path: Iterable[str], attr: str, kind: str) -> dict[str, Any]:
    """name -> plug-in, from the `attr` tuple of each plug-in module of `package` (a module without
    it, e.g. a family's layer classes, contributes nothing); a name defined twice is a bug."""
    found: dict[str, Any] = {}
    for name in plugin_modules(path):
        module = importlib.import_module(f"{package}.{name}")
        for plugin in getattr(module, attr, ()):
            if plugin.name in found:
                raise RuntimeError(f"{kind} {plugin.name!r} is defined twice ({module.__name__})")
            found[plugin.name] = plugin
    return found
