"""gpt: a generic Megatron GPT decoder described field by field, with no Hugging Face class."""

from __future__ import annotations

from typing import Any

from ..hf_fields import HFConfig, HFImportError
from ..schema import ModelConfig
from .base import Family, ModelFields


def _import(c: HFConfig, m: ModelFields) -> None:
    raise HFImportError("the gpt family imports no Hugging Face model_type")  # hf_model_types is empty


def _export(model: ModelConfig, cfg: dict[str, Any]) -> None:
    raise HFImportError(f"model.architecture {model.architecture!r} has no Hugging Face export mapping")


FAMILIES = (
    Family(name="gpt", summary="Generic Megatron GPT decoder (any [model] fields; no Hugging Face bridge)",
           hf_model_types=(), hf_class="", base="_base/pretrain", import_hf=_import, export_hf=_export),
)
