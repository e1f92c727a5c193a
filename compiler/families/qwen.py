"""Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and Qwen3-MoE."""

from __future__ import annotations

from typing import Any

from ..hf_fields import HFConfig, fail
from ..schema import ModelConfig
from . import _decoder as d
from .base import Family, ModelFields


def _importer(*, qkv_bias: bool = False, qk_norm: bool = False, moe: bool = False) -> Any:
    def import_hf(c: HFConfig, m: ModelFields) -> None:
        d.import_decoder(c, m, qkv_bias=qkv_bias, qk_norm=qk_norm)
        d.refuse_window(c, switch="use_sliding_window")
        d.import_rope(c, m)
        if moe:
            d.import_moe(c, m, expert_size_field="moe_intermediate_size")
            if not c.flag("norm_topk_prob"):
                raise fail("norm_topk_prob", "norm_topk_prob = false (top-k router probabilities not "
                           "renormalized) cannot be expressed: recipec's router renormalizes")
            if c.array("mlp_only_layers"):
                raise fail("mlp_only_layers", "dense layers mixed into an MoE model (mlp_only_layers) cannot be "
                           "expressed")
            if c.integer("decoder_sparse_step", 1) != 1:
                raise fail("decoder_sparse_step", "decoder_sparse_step != 1 (not every layer MoE) cannot be expressed")
            d.refuse_moe_extras(c)
    return import_hf


def _exporter(*, qkv_bias: bool = False, qk_norm: bool = False, moe: bool = False) -> Any:
    def export_hf(model: ModelConfig, cfg: dict[str, Any]) -> None:
        d.export_decoder(model, cfg, qkv_bias=qkv_bias, qk_norm=qk_norm)
        if moe:
            d.export_moe(model, cfg)
            cfg.update(moe_intermediate_size=model.moe_ffn_hidden_size, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[])
        else:
            d.refuse_moe(model, cfg)
        cfg.update(use_sliding_window=False, sliding_window=None)
        if qk_norm:
            cfg["attention_bias"] = False
        d.export_rope(model, cfg)
    return export_hf


FAMILIES = (
    Family(name="qwen2", summary="Qwen2 / Qwen2.5: the Llama decoder with q/k/v biases",
           hf_model_types=("qwen2",), hf_class="Qwen2ForCausalLM", base="_base/qwen25",
           import_hf=_importer(qkv_bias=True), export_hf=_exporter(qkv_bias=True)),
    Family(name="qwen3", summary="Qwen3 (dense): per-head q/k RMSNorm, no biases",
           hf_model_types=("qwen3",), hf_class="Qwen3ForCausalLM", base="_base/qwen3",
           import_hf=_importer(qk_norm=True), export_hf=_exporter(qk_norm=True)),
    Family(name="qwen3_moe", summary="Qwen3-MoE: Qwen3 attention, top-k routed experts (moe_intermediate_size)",
           hf_model_types=("qwen3_moe",), hf_class="Qwen3MoeForCausalLM", base="_base/qwen3_moe",
           import_hf=_importer(qk_norm=True, moe=True), export_hf=_exporter(qk_norm=True, moe=True)),
)
