"""torch.compile for the local (non-Transformer-Engine) layer spec, one block at a time.

``compile_transformer_layers`` compiles each ``TransformerLayer`` of each model chunk on its
own, in place, the way torchtitan does: ``module.compile()`` sets the module's compiled call
and leaves the module object, its parameters, state_dict / sharded_state_dict keys and hooks
untouched, so keyed init, LoRA, DDP wrapping and dist checkpointing see the same model.

Why per block and not the whole GPTModel: the graphs stay small (one layer, compiled in
seconds), the embedding / loss / pipeline code around them stays eager Python, and identical
layers share one compiled graph. Measured on megatron-core 0.16.1 + torch 2.13 (CPU, fp32,
tiny Llama): the two layers of a chunk give one dynamo graph (``unique_graphs == 1``; dynamo
lifts the parameters to graph inputs, so the second layer reuses the first's code instead of
recompiling, and a deep model does not hit the recompile limit); inductor matches eager
(loss and every gradient) to fp32 rounding. Only for the local spec: Transformer Engine
modules are opaque to dynamo (TE wraps its module forwards in ``torch._dynamo.disable``,
NVIDIA/TransformerEngine#312; every TE module is a graph break, #705), so
``layer_spec.gpt_layer_spec`` picks the local spec when ``train.torch_compile`` is set.

Graph breaks in a 0.16.1 ``TransformerLayer`` (``TORCH_LOGS=graph_breaks``) and their handling:

- ``RowParallelLinear`` passes ``tp_group=None`` down, so ``get_tensor_model_parallel_group_if_none``
  calls ``warnings.warn(..., DeprecationWarning)`` on every forward of linear_proj and
  linear_fc2; dynamo cannot trace ``warnings.warn`` (nor reorder it: the category is a
  class). Fixed: ``warnings.warn`` goes into ``torch._dynamo.config.ignore_logging_functions``
  (process wide, but only while dynamo traces; eager code still warns).
- TP > 1 without CUDA_DEVICE_MAX_CONNECTIONS=1 (CPU runs): the one-shot advice to set it ends in
  ``setattr`` on a function (``linear_with_grad_accumulation_and_async_allreduce.warned``).
  Fixed: the flag is set before tracing (the advice is about CUDA streams).
- That leaves the dense layer (GQA, RoPE, SwiGLU, RMSNorm, qk-layernorm, qkv bias, hidden
  dropout, ``make_viewless_tensor``, Megatron's linear autograd Functions, SDPAttention)
  as one graph, fullgraph-clean; full recompute wraps the compiled layers from outside.
- Left as graph breaks (correct, only slower): TP > 1 (ColumnParallelLinear's backward
  all-reduces with ``async_op=True``, which dynamo refuses, so linear_qkv / linear_fc1 run
  eager), ``attention_dropout > 0`` (SDPAttention forks Megatron's RNG tracker:
  ``torch.get_rng_state`` is skipped by dynamo), ``recompute_granularity="selective"``
  (CheckpointFunction saves RNG states, ``Tensor.item()``) and MoE (data-dependent routing).

Hence ``fullgraph=False`` by default (a graph break costs speed, not the run), and
``dynamic=False``: batches always have the recipe's shape (SFT pads to seq_length).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.transformer.transformer_layer import TransformerLayer

Backend = str | Callable[..., Callable[..., object]]


def _silence_warnings_in_compiled_code() -> None:
    """Make ``warnings.warn`` a no-op while dynamo traces, and mark Megatron's one-shot
    CUDA_DEVICE_MAX_CONNECTIONS advice as given (see the module docstring)."""
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    tp_layers.linear_with_grad_accumulation_and_async_allreduce.warned = True


def _is_transformer_engine(layer: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("transformer_engine") for m in layer.modules())


def compile_transformer_layers(
    chunks: list[torch.nn.Module], *, backend: Backend = "inductor", fullgraph: bool = False
) -> int:
    """Compile every ``TransformerLayer`` in ``chunk.decoder.layers``, in place; return how many.

    ``chunks`` are the bare GPTModel chunks (before DDP wrapping). Compilation is lazy: the
    first forward of each new input signature traces and compiles. A layer built from
    Transformer Engine modules is refused (dynamo cannot see into it).
    """
    _silence_warnings_in_compiled_code()
    count = 0
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        if decoder is None:
            raise TypeError(f"expected a GPTModel chunk (before DDP wrapping), got {type(chunk).__name__}")
        for layer in decoder.layers:
            if not isinstance(layer, TransformerLayer):
                raise TypeError(f"expected a TransformerLayer, got {type(layer).__name__}")
            if _is_transformer_engine(layer):
                raise ValueError("torch.compile needs the local layer spec: Transformer Engine modules are "
                                 "opaque to dynamo")
            layer.compile(backend=backend, fullgraph=fullgraph, dynamic=False)
            count += 1
    return count
