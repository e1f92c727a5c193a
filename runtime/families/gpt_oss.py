"""GPT-OSS at run time: its HF weight table, YaRN's truncate switch, and a training fix for biased experts.

Hugging Face (transformers GptOssForCausalLM) -> Megatron-Core local-spec module names:
- q/k/v/o weights *and biases* (fused qkv, the shared "qkv" transform);
- `self_attn.sinks` [heads] -> `core_attention.softmax_offset` (Megatron's learnable softmax offset:
  the same extra logit per head, joined to every softmax row and dropped after it);
- `mlp.router.{weight,bias}` -> `mlp.router.{weight,bias}` (Megatron's router has a bias under
  add_bias_linear);
- the experts are *stacked* in HF, one tensor per layer for all experts:
  `gate_up_proj` [E, hidden, 2*I] with gate/up in alternating columns (gate = [..., ::2],
  up = [..., 1::2]) and `gate_up_proj_bias` [E, 2*I] alike; `down_proj` [E, I, hidden] (x @ W, so
  transposed against a Linear) and `down_proj_bias` [E, hidden]. Megatron keeps one MLP per expert
  with linear_fc1 = [gate rows; up rows] [2*I, hidden] and linear_fc2 [hidden, I].
  An HF name `X[{E}]` in the table means "expert E's slice (dim 0) of the stacked tensor X": the
  HF reader reads only that slice and `convert mcore-to-hf` stacks the slices back into X
  (runtime/hf/mappings.stacked_name); the transforms below turn one expert's slice into its
  Megatron tensor and back.

The activation, clamp, glu offset, window, sinks and YaRN are generic [model] fields that
runtime/model.py maps (on the local path, layers with a window or sinks use Megatron's own
DotProductAttention); only YaRN's `truncate` (rope_yarn_truncate -> Megatron's
yarn_correction_range_round_to_int) and unfused RoPE are set here, through `config_kwargs`. The
layer-spec hook swaps per-expert MLPs' linear_fc2 for one that survives Megatron's in-place bias
add in training (`_CopiesBiasedOutput`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from ..hf.mappings import Shape
from ._decoder import COMMON, QKV_BIAS, H, L, X
from .base import Rule, RuntimeFamily, spec_parts

HX = H + "mlp.experts."


def _to_fc1(ts: Sequence[torch.Tensor], s: Shape) -> torch.Tensor:
    """One expert's HF gate_up_proj [hidden, 2I] (or its bias [2I]), gate/up interleaved by column
    -> Megatron's linear_fc1 [2I, hidden] (bias [2I]): all gate rows, then all up rows."""
    (t,) = ts
    if t.dim() not in (1, 2) or t.shape[-1] % 2:
        raise ValueError(f"gate_up_proj (one expert) has shape {tuple(t.shape)}, expected [hidden, 2I] or [2I]")
    if t.dim() == 2:
        t = t.t()
    return torch.cat([t[0::2], t[1::2]]).contiguous()


def _from_fc1(t: torch.Tensor, s: Shape) -> list[torch.Tensor]:
    if t.dim() not in (1, 2) or t.shape[0] % 2:
        raise ValueError(f"linear_fc1 has shape {tuple(t.shape)}, expected an even number of rows")
    gate, up = torch.chunk(t, 2, dim=0)
    out = torch.stack([gate, up], dim=1).reshape(t.shape)  # rows gate0, up0, gate1, up1, ...
    return [(out.t() if t.dim() == 2 else out).contiguous()]


def _to_fc2(ts: Sequence[torch.Tensor], s: Shape) -> torch.Tensor:
    """One expert's HF down_proj [I, hidden] (x @ W) -> Megatron's linear_fc2 [hidden, I]."""
    (t,) = ts
    if t.dim() != 2:
        raise ValueError(f"down_proj (one expert) has shape {tuple(t.shape)}, expected [I, hidden]")
    return t.t().contiguous()


def _from_fc2(t: torch.Tensor, s: Shape) -> list[torch.Tensor]:
    if t.dim() != 2:
        raise ValueError(f"linear_fc2 has shape {tuple(t.shape)}, expected [hidden, I]")
    return [t.t().contiguous()]


TRANSFORMS = {"gpt_oss_fc1": (_to_fc1, _from_fc1), "gpt_oss_fc2": (_to_fc2, _from_fc2)}

WEIGHTS = COMMON + QKV_BIAS + (
    Rule(L + "self_attention.linear_proj.bias", (H + "self_attn.o_proj.bias",)),
    Rule(L + "self_attention.core_attention.softmax_offset", (H + "self_attn.sinks",)),
    Rule(L + "mlp.router.weight", (H + "mlp.router.weight",)),
    Rule(L + "mlp.router.bias", (H + "mlp.router.bias",)),
    Rule(X + "linear_fc1.weight", (HX + "gate_up_proj[{E}]",), "gpt_oss_fc1"),
    Rule(X + "linear_fc1.bias", (HX + "gate_up_proj_bias[{E}]",), "gpt_oss_fc1"),
    Rule(X + "linear_fc2.weight", (HX + "down_proj[{E}]",), "gpt_oss_fc2"),
    Rule(X + "linear_fc2.bias", (HX + "down_proj_bias[{E}]",)),
)
# SequentialMLP saves its expert biases as `experts.experts.*.bias`, like the weights.
ALIASES = {
    "decoder.layers.mlp.experts.experts.linear_fc1.bias": X + "linear_fc1.bias",
    "decoder.layers.mlp.experts.experts.linear_fc2.bias": X + "linear_fc2.bias",
}


def _config_kwargs(model: Any) -> dict[str, Any]:
    """YaRN's truncation switch (HF rope_parameters.truncate; False for gpt-oss), as the config
    attribute GPTModel's YarnRotaryEmbedding reads, and unfused RoPE (below)."""
    if model.rope_scaling != "yarn":
        return {}
    # YaRN's attention factor (0.1 ln 32 + 1 = 1.35 for gpt-oss) scales cos/sin, which TE's fused RoPE
    # cannot: Megatron 0.16 falls back to the unfused kernel with a warning per call for plain
    # sequences, and its packed (thd) fused path would drop the factor. Unfused from the start.
    return {"yarn_correction_range_round_to_int": model.rope_yarn_truncate, "apply_rope_fusion": False}


class _CopiesBiasedOutput:
    """Mixin for an expert's linear_fc2 whose output takes its bias in place afterwards.

    Megatron-Core's MLP adds an expert's linear_fc2 bias into the output in place
    (`output += output_bias * per_token_scale`, SequentialMLP's per-expert MLPs). That output can be a
    view autograd refuses to modify in place: the tensor-parallel reduce's input returned as is on
    the local spec ("Output 0 of _ReduceFromModelParallelRegion is a view"), TE's linear output on
    the TE spec ("Output 0 of _LinearBackward is a view", GPT-OSS with per-expert MLPs on an H200).
    So training a biased MoE with per-expert MLPs fails on both; a copy (only with a bias, only
    with grad) fixes it. Grouped-GEMM experts add the bias themselves and need no copy."""

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output, bias = super().forward(input_, *args, **kwargs)  # type: ignore[misc]
        if bias is not None and torch.is_grad_enabled():
            output = output.clone()
        return output, bias


@functools.cache
def _copying(linear: type) -> type:
    """`linear` (RowParallelLinear, TERowParallelLinear, ...) with _CopiesBiasedOutput mixed in."""
    return type(f"Expert{linear.__name__}", (_CopiesBiasedOutput, linear), {})


def _fix_expert_bias(layer: Any) -> None:
    _, layer_sub = spec_parts(layer)
    _, moe_sub = spec_parts(getattr(layer_sub, "mlp", None))
    module, sub = spec_parts(getattr(moe_sub, "experts", None))
    fc2 = getattr(sub, "linear_fc2", None)
    if module is SequentialMLP and isinstance(fc2, type) and not issubclass(fc2, _CopiesBiasedOutput):
        sub.linear_fc2 = _copying(fc2)


def _layer_spec(model: Any, ctx: Any) -> Any:
    """The generic decoder spec (Megatron's own DotProductAttention on the local path: windows and
    sinks), with per-expert MLPs able to train with biases, on the local and the TE spec."""
    from ..layer_spec import decoder_spec

    spec = copy.deepcopy(decoder_spec(model, ctx)[0])
    if model.add_bias_linear:
        for layer in getattr(spec, "layer_specs", None) or [spec]:
            _fix_expert_bias(layer)
    return spec


FAMILIES = (
    RuntimeFamily(name="gpt_oss", weights=WEIGHTS, transforms=TRANSFORMS, checkpoint_aliases=ALIASES,
                  config_kwargs=_config_kwargs, layer_spec=_layer_spec),
)
