"""Runtime halves of the training-mode plug-ins, found by `train.mode` (design: Plug-ins).

Each mode is one module here with a `MODE` class (see base.TrainingMode): what it builds from
the artifact (datasets, frozen extra models), this rank's microbatches of a step, the forward
step and loss, and the metrics its loss reports. train.py sets up the model, weights, LoRA,
DDP and the optimizer; loop.py runs the steps every mode shares. The compiler half of a mode
is compiler/modes/<mode>.py. Adding one is a module here and one there, each named after
its `train.mode` value; no shared code names a mode.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Context, TrainingMode

def build_mode(context: Context) -> TrainingMode:
    """The runtime half of this artifact's mode (the compiler derived train.mode when it was unset)."""
    name = context.config.train.mode
    assert name is not None, "a compiled artifact always carries train.mode"
    return importlib.import_module(f"{__name__}.{name}").MODE(context)  # compiler/modes checked the name
