"""Fixtures shared across test folders (imports are lazy: tests/compiler never loads torch)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def mcore_tp1() -> Iterator[None]:
    """A single-rank gloo group with TP=PP=1 model-parallel state for the whole module."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from recipec.runtime.hf.convert import ensure_distributed

    created = ensure_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
