"""The compiler half of a model family: what `model.architecture = "<name>"` means, torch-free.

A family module (compiler/families/<name>.py) defines `FAMILIES = (Family(...), ...)`; the
registry (compiler/families/__init__.py) finds it, so adding a family edits no central list.
The runtime half (weights, layer spec, Megatron kwargs) lives in runtime/families/<name>.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..hf_fields import HFConfig

if TYPE_CHECKING:
    from ..schema import ModelConfig

__all__ = ["Family", "FamilyProblem", "HFConfig", "ModelFields", "no_problems"]


class ModelFields(dict[str, Any]):
    """`[model]` values read from a config.json, each remembering the HF field it came from, so a
    value the schema refuses is reported against config.json's own key (`m.put(key, value, field)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def put(self, key: str, value: Any, field: str | None = None) -> None:
        self[key] = value
        if field is not None:
            self.fields[key] = field


@attrs.frozen
class FamilyProblem:
    """A [model] combination this family cannot express: reported as a validation error (exit 2)."""

    key: str  # dotted, e.g. "model.window_size"
    message: str
    hint: str | None = None


def no_problems(model: ModelConfig) -> Iterable[FamilyProblem]:
    """The default `Family.validate`: nothing family-specific to check."""
    return ()


@attrs.frozen
class Family:
    """One value of `model.architecture`, with its Hugging Face bridge and its own validation.

    `import_hf(c, m)` maps a config.json (read through the typed `HFConfig`; errors via
    `hf_fields.fail(field, message, hint=)`) onto `[model]` fields in `m`; `export_hf(model, cfg)`
    writes the derived ModelConfig's config.json keys into `cfg` (raising HFImportError for what the
    HF class cannot hold). `base` is the bundled `_base/...` recipe an imported model extends, or a
    function of the imported fields choosing one (Llama 2 / 3 / 3.1 / 3.2 share one family).
    """

    name: str
    summary: str
    hf_model_types: tuple[str, ...]
    hf_class: str
    base: str | Callable[[Mapping[str, Any]], str]
    import_hf: Callable[[HFConfig, ModelFields], None]
    export_hf: Callable[[ModelConfig, dict[str, Any]], None]
    validate: Callable[[ModelConfig], Iterable[FamilyProblem]] = no_problems

    def base_for(self, fields: Mapping[str, Any]) -> str:
        """The `_base/...` recipe an import with these [model] fields extends."""
        return self.base if isinstance(self.base, str) else self.base(fields)
