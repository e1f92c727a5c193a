"""Mixtral: the Mistral decoder with top-k routed SwiGLU experts (block_sparse_moe)."""

from __future__ import annotations

from typing import Any

from ..hf_fields import HFConfig, HFImportError
from ..schema import ModelConfig
from . import _decoder as d
from .base import Family, ModelFields


def _import(c: HFConfig, m: ModelFields) -> None:
    d.import_decoder(c, m)
    d.refuse_window(c)
    d.import_rope(c, m)
    d.import_moe(c, m)
    d.refuse_moe_extras(c)


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    d.export_decoder(model, cfg)
    d.export_moe(model, cfg)
    if model.moe_ffn_hidden_size != model.ffn_hidden_size:
        raise HFImportError("mixtral export needs moe_ffn_hidden_size == ffn_hidden_size")
    cfg["sliding_window"] = None
    d.export_rope(model, cfg)


FAMILIES = (
    Family(name="mixtral", summary="Mixtral 8x7B/8x22B: the Mistral decoder with top-2 routed experts",
           hf_model_types=("mixtral",), hf_class="MixtralForCausalLM", base="_base/mixtral",
           import_hf=_import, export_hf=_export),
)
