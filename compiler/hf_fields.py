"""Typed reading of a Hugging Face config.json: every field checked before it is used.

A config.json is a file from anywhere. `hidden_size: "abc"`, `rope_scaling: "yes"`,
`architectures: []`, a bool where an int belongs, NaN (Python's json reads it):
each must be an `HFImportError` that names the field, never a TypeError from deep
inside the mapping. `HFConfig` is the only way `hf_import` reads a field; JSON
null counts as absent, as transformers writes it for unset options.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

from .errors import Problem, RecipeError
from .text import shown

MAX_BYTES = 16 * 2**20  # a config.json is a few KB; anything this large is not one
_MISSING: Any = object()


class HFImportError(RecipeError):
    """A Hugging Face config that recipec cannot express (or cannot read)."""


def fail(field: str, message: str, hint: str | None = None) -> HFImportError:
    return HFImportError([Problem(HFImportError, message, key=f"config.json:{field}", hint=hint)])


def _json(value: Any) -> str:
    try:
        return shown(json.dumps(value), 80)
    except ValueError:  # a structure too deep or odd to print
        return type(value).__name__


@attrs.frozen
class HFConfig:
    """A config.json object (or one of its sub-objects, e.g. rope_scaling, named by `prefix`)."""

    data: dict[str, Any]
    prefix: str = ""

    def _raw(self, name: str, default: Any) -> tuple[Any, bool]:
        """(value, given): the default when the field is absent or null."""
        value = self.data.get(name)
        if value is None:
            if default is _MISSING:
                raise fail(self.prefix + name, f"{self.prefix + name} is missing from config.json")
            return default, False
        return value, True

    def _wrong(self, name: str, value: Any, expected: str) -> HFImportError:
        return fail(self.prefix + name, f"{self.prefix + name} must be {expected}, got {_json(value)}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def integer(self, name: str, default: Any = _MISSING, *, min: int = 1) -> Any:
        value, given = self._raw(name, default)
        if not given:
            return value
        if isinstance(value, float) and value.is_integer():  # 4096.0, as some exporters write it
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(name, value, "an integer")
        if value < min:
            raise self._wrong(name, value, f"an integer >= {min}")
        return value

    def number(self, name: str, default: Any = _MISSING, *, min: float | None = None) -> Any:
        value, given = self._raw(name, default)
        if not given:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._wrong(name, value, "a number")
        if not math.isfinite(value) or (min is not None and value < min):
            raise self._wrong(name, value, "a finite number" + (f" >= {min}" if min is not None else ""))
        return float(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value, given = self._raw(name, default)
        if given and not isinstance(value, bool):
            raise self._wrong(name, value, "true or false")
        return value

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._raw(name, default)
        if given and not isinstance(value, str):
            raise self._wrong(name, value, "a string")
        return value

    def choice(self, name: str, choices: dict[str, Any], default: Any = _MISSING) -> Any:
        """choices[value] for a string field that must be one of `choices`' keys (the default when absent)."""
        value, given = self._raw(name, default)
        if not given:
            return value
        if not isinstance(value, str) or value not in choices:
            raise self._wrong(name, value, "one of " + ", ".join(f'"{k}"' for k in choices))
        return choices[value]

    def texts(self, name: str) -> list[str] | None:
        """A list of strings, or None when absent."""
        value, given = self._raw(name, None)
        if not given:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong(name, value, "a list of strings")
        return value

    def array(self, name: str) -> list[Any] | None:
        """A list of anything, or None when absent."""
        value, given = self._raw(name, None)
        if given and not isinstance(value, list):
            raise self._wrong(name, value, "a list")
        return value if given else None

    def table(self, name: str) -> HFConfig | None:
        """A sub-object (rope_scaling, rope_parameters), or None when absent."""
        value, given = self._raw(name, None)
        if not given:
            return None
        if not isinstance(value, dict):
            raise self._wrong(name, value, "an object ({...})")
        return HFConfig(value, f"{self.prefix}{name}.")


def read_hf_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed config.json of a local HF model directory (or of the file itself)."""
    p = Path(path)
    try:
        file = p / "config.json" if p.is_dir() else p
        found = file.is_file()
    except (OSError, ValueError) as exc:  # too long a name, no permission, a NUL byte
        raise HFImportError([Problem(HFImportError, f"cannot look up {shown(str(p))}: "
                                     f"{getattr(exc, 'strerror', None) or exc}", key=str(p))]) from None
    if not found:
        raise HFImportError([Problem(HFImportError, f"no config.json at {shown(str(file))}", key=str(p),
                                     hint="pass a local Hugging Face model directory (nothing is downloaded)")])
    try:
        with open(file, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES // 2**20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = getattr(exc, "strerror", None) or ("nested too deeply" if isinstance(exc, RecursionError) else exc)
        raise HFImportError([Problem(HFImportError, f"{shown(str(file))} is not readable JSON ({shown(str(reason))})",
                                     key=str(file))]) from None
    if not isinstance(data, dict):
        raise HFImportError([Problem(HFImportError, f"{shown(str(file))} does not hold a JSON object", key=str(file))])
    return data, file.parent
