"""Llama (1/2/3/3.1/3.2) and Mistral: the plain RMSNorm + SwiGLU + RoPE decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..hf_fields import HFConfig
from ..schema import ModelConfig
from . import _decoder as d
from .base import Family, ModelFields


def _import(c: HFConfig, m: ModelFields) -> None:
    d.import_decoder(c, m)
    d.refuse_window(c)
    d.import_rope(c, m)


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    d.export_decoder(model, cfg)
    d.refuse_moe(model, cfg)
    cfg.update(attention_bias=False, mlp_bias=False)
    d.export_rope(model, cfg)


def _export_mistral(model: ModelConfig, cfg: dict[str, Any]) -> None:
    _export(model, cfg)
    cfg["sliding_window"] = None  # MistralConfig's default is 4096: say "no window" explicitly


def _llama_base(fields: Mapping[str, Any]) -> str:
    """Llama 3.1/3.2 by their RoPE scaling (3.2 ties its embeddings), Llama 3 by its theta."""
    if fields.get("rope_scaling") == "llama3":
        return "_base/llama32" if fields.get("share_embeddings_and_output_weights") else "_base/llama31"
    return "_base/llama3" if fields.get("rotary_base", 10000.0) >= 500000 else "_base/llama2"


FAMILIES = (
    Family(name="llama", summary="Llama 1/2/3/3.1/3.2: RMSNorm, SwiGLU, RoPE (llama3/linear scaling), GQA",
           hf_model_types=("llama",), hf_class="LlamaForCausalLM", base=_llama_base,
           import_hf=_import, export_hf=_export),
    Family(name="mistral", summary="Mistral 7B (v0.2+, no sliding window): the Llama decoder",
           hf_model_types=("mistral",), hf_class="MistralForCausalLM", base="_base/mistral",
           import_hf=_import, export_hf=_export_mistral),
)
