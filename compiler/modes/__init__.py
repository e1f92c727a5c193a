"""Training-mode plug-ins, found by their recipe key `train.mode` (design: Plug-ins).

Each mode is one module here with a `MODE` object (see base.Mode): its validation rules, the
frozen models it adds to the memory / FLOPs estimate (a DPO reference, a distillation teacher),
and nothing else. Its runtime half is `runtime/modes/<mode>.py` (datasets, batch layout, forward
step and loss, metrics). Adding a mode is a module here and one there (both found by
their file names); no shared code names a mode.

`train.mode` may be left unset; it is then derived from the data: `data.kind = "sft"` selects
"sft", every other data kind "pretrain" (`resolved_mode`). So recipes written before modes
existed compile to the same run.

This package's top level imports nothing of the compiler, so the schema can take its
`train.mode` choices from `MODES`; the modules load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import ExtraModel, Finding, Mode

def _discover() -> dict[str, str]:
    """train.mode value -> module of this package that defines MODE: every module whose name does
    not start with "_", except `base` (no central list: adding a mode is adding its module). The
    modules are not imported here, so `recipec build` pays only for the mode it compiles."""
    from ..plugins import plugin_modules

    return {name: name for name in plugin_modules(__path__)}


MODES: dict[str, str] = _discover()

DERIVED_RULE = 'sft when data.kind is "sft", else pretrain'


def mode_for(name: str) -> Mode:
    """The plug-in for `train.mode = name` (the schema has already refused unknown names)."""
    return importlib.import_module(f"{__name__}.{MODES[name]}").MODE


def resolved_mode(config: RecipeConfig) -> str:
    """train.mode as set, else derived from the data (see the module doc)."""
    if config.train.mode is not None:
        return config.train.mode
    return "sft" if config.data.kind == "sft" else "pretrain"


def rules(config: RecipeConfig) -> Iterator[Finding]:
    """This recipe's mode's own validation rules, its [train.mode_options] checked first."""
    mode = mode_for(resolved_mode(config))
    yield from _option_problems(mode, config.train.mode_options)
    yield from mode.rules(config)


def options(config: RecipeConfig) -> Any:
    """The mode's options object built from [train.mode_options] (its defaults for keys not set),
    or None for a mode without options. Call on a validated config (the runtime's is)."""
    import attrs

    cls = mode_for(resolved_mode(config)).options
    return None if cls is None else attrs.resolve_types(cls)(**config.train.mode_options)


def _option_problems(mode: Mode, table: dict[str, Any]) -> Iterator[Finding]:
    import attrs

    from ..errors import did_you_mean
    from ..schema._fields import check_value

    fields = {}
    if mode.options is not None:
        fields = {f.name: f for f in attrs.fields(attrs.resolve_types(mode.options))}
    for key, value in table.items():
        where = f"train.mode_options.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            yield (where, f"train.mode {mode.name!r} has no option {key!r} (its options: {known})",
                   did_you_mean(key, list(fields)) or f"remove it with ~{where}")
            continue
        problem = check_value(fields[key], value)
        if problem:
            yield (where, f"{where}: {problem}", fields[key].metadata.get("help"))


def extra_models(config: RecipeConfig) -> tuple[ExtraModel, ...]:
    """The frozen models this recipe's mode builds beside the trained one (none for pretrain/sft)."""
    return tuple(mode_for(resolved_mode(config)).extra_models(config))
