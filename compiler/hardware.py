"""Accelerators recipec plans for: memory and dense peak throughput.

Peaks are the vendors' dense (no sparsity) figures per GPU; MFU is measured
against them. Memory is what the runtime may use, not the marketing number.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Accelerator:
    name: str
    memory_gib: float
    peak_tflops_bf16: float
    peak_tflops_fp8: float


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("H100-80GB", 79.1, 989.0, 1979.0),
        Accelerator("H200-141GB", 139.8, 989.0, 1979.0),
        Accelerator("A100-80GB", 79.1, 312.0, 312.0),
        Accelerator("B200-180GB", 178.0, 2250.0, 4500.0),
        Accelerator("cpu", 0.0, 0.0, 0.0),
    )
}
