"""Walking a Megatron-Core sharded_state_dict down to its ShardedTensors.

Shared by the core (runtime/init.py's keyed init, runtime/lora.py's adapter init) and the HF
bridge (runtime/hf/convert.py, verify.py), so it lives outside runtime/hf.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def sharded_tensors(tree: Any) -> Iterator[Any]:
    """Every ShardedTensor in `tree` (a sharded_state_dict, or any dict/list/tuple of its entries), in order.

    Factories (the gated MLP's fc1 is saved as two halves) are expanded; the halves they build are views
    of the parameter, so writing them writes it. Other entries (ShardedObject, plain values) are skipped.
    """
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    stack = [tree]
    while stack:
        item = stack.pop(0)
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            stack[:0] = list(built.values()) if isinstance(built, dict) else list(built)
        elif isinstance(item, ShardedTensor):
            yield item
        elif isinstance(item, dict):
            stack[:0] = list(item.values())
        elif isinstance(item, (list, tuple)):
            stack[:0] = list(item)
