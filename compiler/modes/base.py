"""What a training mode's compiler half is (torch-free).

A mode (`train.mode`) owns the rules only it cares about and the frozen models it needs beside
the trained one. The estimate (compiler/estimate.py) adds each extra model's weights to the
memory per GPU (frozen: no gradients, no optimizer state) and its forward pass to the FLOPs of
a step; the runtime half builds them (runtime/modes/).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from ..schema import ModelConfig, RecipeConfig

Finding = tuple[str, str, str | None]  # (dotted key, message, hint), as compiler/validate.py reports them


@attrs.frozen
class ExtraModel:
    """A frozen model a mode runs beside the trained one (DPO's reference, a distillation teacher).

    `forwards_per_sequence`: how many forward passes it makes per trained sequence (a DPO
    reference sees the chosen and the rejected sequence: that is in the batch already, so 1).
    """

    role: str
    model: ModelConfig
    forwards_per_sequence: float = 1.0


class Mode(Protocol):
    """The compiler half of one training mode.

    `options`: an attrs class of the mode's own keys (fields made with schema._fields.option, so
    they carry help, bounds and choices), read from the free table `[train.mode_options]`; None
    for a mode without keys. compiler/modes checks unknown keys and values against it.
    """

    name: str
    options: type | None

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        """Problems of this recipe that only this mode cares about (errors, with their keys)."""
        ...

    def extra_models(self, config: RecipeConfig) -> Iterable[ExtraModel]:
        """Frozen models this mode builds beside the trained one (for the memory/FLOPs estimate)."""
        ...
