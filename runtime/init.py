"""Layout-independent weight initialization.

Megatron's CPU initialization draws full master weights in construction order:
independent of TP, but not of PP (a later stage never draws the earlier layers).
Drawing each global tensor from a generator keyed by its checkpoint key and
taking this rank's shard by its global offset gives identical weights under
every TP/PP/VPP layout, so a layout change never changes the model: the runtime
uses it on CPU, where full tensors are cheap. Std follows Megatron: N(0, std)
for inputs, N(0, std / sqrt(2 * num_layers)) for output projections, ones for
norms (zeros where they are stored zero-centred), zeros for biases.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from .sharded import sharded_tensors

_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def keyed_init(chunks: list[Any], seed: int, std: float, num_layers: int) -> None:
    with torch.no_grad():
        for chunk in chunks:
            # Zero-centred norms (Gemma) apply (1 + w): the identity is w = 0.
            norm_init = torch.zeros if getattr(chunk.config, "layernorm_zero_centered_gamma", False) else torch.ones
            for sharded in sharded_tensors(chunk.sharded_state_dict()):
                if sharded.flattened_range is not None:
                    continue
                key = sharded.key
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                if key.endswith("bias"):
                    full = torch.zeros(sharded.global_shape)
                elif "norm" in key:
                    full = norm_init(sharded.global_shape)
                else:
                    scale = std / math.sqrt(2 * num_layers) if key.endswith(_OUTPUT_PROJECTIONS) else std
                    full = torch.randn(sharded.global_shape, generator=generator) * scale
                index: list[Any] = list(sharded.global_offset[: sharded.prepend_axis_num])
                for dim, offset in enumerate(sharded.global_offset[sharded.prepend_axis_num:]):
                    index.append(slice(offset, offset + sharded.data.shape[dim]))
                sharded.data.copy_(full[tuple(index)].to(sharded.data.dtype))
