"""The runtime half of a model family: its HF weight table, layer spec and Megatron extras.

A family module (runtime/families/<name>.py) defines `FAMILIES = (RuntimeFamily(...), ...)`,
found by the registry (runtime/families/__init__.py) without any central list. Generic
Megatron features ([model] fields such as window_size or multi_latent_attention) are mapped by
runtime/model.py for every family; the hooks here are for what only one family does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..hf.mappings import Rule, Shape

__all__ = ["DEFAULT_LORA_TARGETS", "Rule", "RuntimeFamily", "Shape", "SpecContext", "ToHF", "ToMcore", "no_kwargs"]

#: HF tensors -> the Megatron tensor, and back (runtime/hf/mappings.TRANSFORMS holds the shared ones).
ToMcore = Callable[[Sequence[torch.Tensor], Shape], torch.Tensor]
ToHF = Callable[[torch.Tensor, Shape], list[torch.Tensor]]

#: LoRA target name -> (attribute path inside a transformer layer, column|row parallel).
DEFAULT_LORA_TARGETS: Mapping[str, tuple[str, str]] = {
    "linear_qkv": ("self_attention.linear_qkv", "column"),
    "linear_proj": ("self_attention.linear_proj", "row"),
    "linear_fc1": ("mlp.linear_fc1", "column"),
    "linear_fc2": ("mlp.linear_fc2", "row"),
}


def spec_parts(spec: Any) -> tuple[Any, Any]:
    """A spec's module and submodules: Megatron-Core 0.16 writes ModuleSpecs, 0.19 also
    functools.partial(Module, submodules=...) (the MoE layer and its experts)."""
    if isinstance(spec, functools.partial):
        return spec.func, spec.keywords.get("submodules")
    return getattr(spec, "module", None), getattr(spec, "submodules", None)


def no_kwargs(model: Any) -> dict[str, Any]:
    """The default of the kwargs hooks: nothing family-specific."""
    return {}


@dataclass(frozen=True)
class SpecContext:
    """What a layer-spec hook needs to know about the machine and the build."""

    te: bool  # Transformer Engine modules (else Megatron-Core's local modules)
    on_gpu: bool
    moe_grouped_gemm: bool
    config: Any = None  # the TransformerConfig being built (per-layer specs read moe_layer_freq, windows...)
    vp_stage: int | None = None


@dataclass(frozen=True)
class RuntimeFamily:
    """One `model.architecture` at run time. `weights` is the HF <-> Megatron table (module names
    as the local spec names them); `transforms` adds named, invertible tensor transforms the table
    uses; `checkpoint_aliases` maps more checkpoint keys to module names (mappings.canonical_name).
    `config_kwargs` adds TransformerConfig kwargs (unknown ones are dropped per Megatron version,
    and keys starting with `yarn_` are set as config attributes, as Megatron reads them);
    `layer_spec` replaces the layer/block spec; `model_kwargs` adds GPTModel kwargs; `post_build`
    adjusts each built GPTModel chunk."""

    name: str
    weights: tuple[Rule, ...]
    transforms: Mapping[str, tuple[ToMcore, ToHF]] = field(default_factory=dict)
    checkpoint_aliases: Mapping[str, str] = field(default_factory=dict)
    lora_targets: Mapping[str, tuple[str, str]] = field(default_factory=lambda: dict(DEFAULT_LORA_TARGETS))
    config_kwargs: Callable[[Any], dict[str, Any]] = no_kwargs
    layer_spec: Callable[[Any, SpecContext], Any] | None = None
    model_kwargs: Callable[[Any], dict[str, Any]] = no_kwargs
    post_build: Callable[[Any, Any], None] | None = None
