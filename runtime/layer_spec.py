"""Pick the GPT layer spec for the machine: Transformer Engine if present, else local+SDPA.

Transformer Engine is the production path on GPUs (fused kernels, fp8).  When it does
not import (CPU boxes, CI, minimal installs) Megatron's local spec is used with its
``DotProductAttention`` swapped for ``runtime.attention.SDPAttention``, because the local
module builds CUDA masks and materialises full score matrices.  The returned label is
logged by the runtime so a run records which attention path it trained with.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec

from recipec.compiler.errors import RecipeError

from .attention import SDPAttention

TE_LABEL = "transformer_engine"
LOCAL_LABEL = "local+sdpa"
LOCAL_MCORE_LABEL = "local"  # Megatron-Core's own local DotProductAttention (windows, softmax offsets)


def _have_transformer_engine() -> bool:
    """True when ``transformer_engine.pytorch`` imports (a broken install counts as absent)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, missing CUDA libs, ABI errors...
        return False
    return True


def _accepted_keywords(fn: Callable[..., Any], module: Any) -> set[str] | None:
    """Keyword names ``fn`` understands; None when it takes anything.

    megatron-core 0.16 spells the parameters out on ``get_gpt_layer_*_spec``; later releases
    turned those into ``(*args, **kwargs)`` wrappers around ``get_gpt_layer_*_submodules``,
    so the twin's signature is the one to read (else e.g. qk_layernorm is silently dropped).
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        twin = getattr(module, fn.__name__.removesuffix("_spec") + "_submodules", None)
        return _accepted_keywords(twin, module) if twin is not None else None
    return set(params)


def _call_supported(fn: Callable[..., ModuleSpec], module: Any, **kwargs: Any) -> ModuleSpec:
    """Call a spec builder with only the keywords it has (they vary by version)."""
    accepted = _accepted_keywords(fn, module)
    return fn(**{k: v for k, v in kwargs.items() if accepted is None or k in accepted})


def uses_transformer_engine(impl: str, torch_compile: bool) -> bool:
    """model.transformer_impl resolved on this machine: "auto" takes TE where it imports, unless
    the layers are to be torch.compiled (TE modules are opaque to dynamo)."""
    if impl == "transformer_engine":
        if not _have_transformer_engine():
            raise RecipeError('model.transformer_impl="transformer_engine" but transformer_engine.pytorch does not '
                              'import here; install recipec[te], or set model.transformer_impl="auto"')
        return True
    return impl == "auto" and not torch_compile and _have_transformer_engine()


def gpt_layer_spec(
    num_experts: int | None,
    moe_grouped_gemm: bool,
    qk_layernorm: bool,
    normalization: str,
    *,
    impl: str = "auto",
    torch_compile: bool = False,
    multi_latent_attention: bool = False,
    megatron_core_attention: bool = False,
) -> tuple[ModuleSpec, str]:
    """Return ``(transformer layer spec, label)`` where label is "transformer_engine",
    "local+sdpa" or "local" (Megatron's own local attention).  ``normalization`` is "LayerNorm" or "RMSNorm" (the TE spec takes it
    from the TransformerConfig instead, so it is only forwarded where accepted).

    ``impl`` is model.transformer_impl (see `uses_transformer_engine`); "transformer_engine"
    without TE is an error rather than a silent switch to the slower path.
    ``multi_latent_attention`` builds Megatron's MLA attention (DeepSeek). On the local path,
    ``megatron_core_attention`` keeps Megatron's own ``DotProductAttention`` (sliding windows,
    softmax offsets/sinks), else recipec's SDPAttention (`LatentSDPAttention` under MLA).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    kwargs = dict(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    if multi_latent_attention:
        kwargs["multi_latent_attention"] = True
    if uses_transformer_engine(impl, torch_compile):
        return _call_supported(specs.get_gpt_layer_with_transformer_engine_spec, specs, **kwargs), TE_LABEL

    spec = copy.deepcopy(_call_supported(specs.get_gpt_layer_local_spec, specs, **kwargs))
    attn = spec.submodules.self_attention
    if not hasattr(attn.submodules, "core_attention"):
        raise TypeError(f"unexpected local attention spec: {attn!r}")
    if megatron_core_attention:
        return spec, LOCAL_MCORE_LABEL
    attn.submodules.core_attention = LatentSDPAttention if multi_latent_attention else SDPAttention
    return spec, LOCAL_LABEL


# ---------------------------------------------------------------- specs from a [model] section
def needs_megatron_attention(model: Any) -> bool:
    """Local-path layers that SDPAttention does not compute: a sliding window, or a softmax with an
    offset or a learned sink (`softmax_type`). Megatron's local DotProductAttention implements both."""
    return bool(model.window_size) or model.softmax_type != "vanilla"


class LatentSDPAttention(SDPAttention):
    """SDPAttention for multi-head latent attention, whose values are narrower (or wider) than its
    queries/keys (DeepSeek-V3: q/k 192, v 128), which Megatron-Core 0.16's local DotProductAttention
    does not take (no k_channels/v_channels). The narrower side is zero-padded to one head dim, which
    changes no score (MLA passes its softmax_scale explicitly) and no output column kept."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        hq, hv = query.shape[-1], value.shape[-1]
        if hq == hv:
            return super().forward(query, key, value, *args, **kwargs)
        d = max(hq, hv)
        query, key, value = (F.pad(t, (0, d - t.shape[-1])) for t in (query, key, value))
        out = super().forward(query, key, value, *args, **kwargs)
        return out.unflatten(-1, (-1, d))[..., :hv].flatten(-2)


class ZeroCenteredNorm(torch.nn.Module):
    """RMSNorm/LayerNorm storing its weight zero-centred, applied as (1 + w) (Gemma; what TE's
    `zero_centered_gamma` computes). Megatron's local WrappedTorchNorm refuses that setting, so the
    local spec uses this instead; the weight keeps torch's norm name and dtype (fp32)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.eps, self.shape = eps, (hidden_size,)
        self.rms = config.normalization == "RMSNorm"
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size))
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (1 + self.weight.float()).to(x.dtype)
        if self.rms:
            return F.rms_norm(x, self.shape, weight, self.eps)
        return F.layer_norm(x, self.shape, weight, self.bias.to(x.dtype), self.eps)


def _swap_norms(spec: ModuleSpec, norm: type) -> ModuleSpec:
    """The layer spec with every torch norm (input, pre-MLP, q/k) replaced by `norm`."""
    from megatron.core.transformer.identity_op import IdentityOp

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm", "pre_cross_attn_layernorm"):
        if getattr(sub, name, IdentityOp) is not IdentityOp:
            setattr(sub, name, norm)
    attn = getattr(sub.self_attention, "submodules", None)
    for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
        if attn is not None and getattr(attn, name, IdentityOp) not in (IdentityOp, None):
            setattr(attn, name, norm)
    return spec


def decoder_spec(model: Any, ctx: Any) -> tuple[Any, str]:
    """(spec for GPTModel's transformer_layer_spec, label) for a derived [model] section.

    One layer spec when every layer is alike; a TransformerBlockSubmodules (this pipeline stage's
    layers, `ctx.vp_stage`) when they differ: dense leading layers (`moe_first_k_dense`, from
    the config's moe_layer_freq list) or, on the local path, zero-centred norms (the final norm
    too). `ctx` is a runtime.families.SpecContext carrying the TransformerConfig.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    impl = "transformer_engine" if ctx.te else "local"
    common: dict[str, Any] = {"qk_layernorm": model.qk_layernorm, "normalization": model.normalization, "impl": impl,
                              "multi_latent_attention": model.multi_latent_attention,
                              "megatron_core_attention": needs_megatron_attention(model)}
    spec, label = gpt_layer_spec(model.num_moe_experts, ctx.moe_grouped_gemm, **common)
    zero_centered = model.layernorm_zero_centered_gamma and not ctx.te
    if zero_centered:
        spec = _swap_norms(spec, ZeroCenteredNorm)
    if not model.moe_first_k_dense and not zero_centered:
        return spec, label
    dense = spec
    if model.moe_first_k_dense:
        dense, _ = gpt_layer_spec(None, False, **common)
        if zero_centered:
            dense = _swap_norms(dense, ZeroCenteredNorm)
    k = model.moe_first_k_dense if model.is_moe else 0
    layers = [dense if i < k else spec for i in range(model.num_layers)]
    config = ctx.config
    offset = get_transformer_layer_offset(config, vp_stage=ctx.vp_stage)
    count = get_num_layers_to_build(config, vp_stage=ctx.vp_stage)
    if zero_centered:
        final: Any = ZeroCenteredNorm
    elif ctx.te:
        from megatron.core.extensions.transformer_engine import TENorm

        final = TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import LNImpl

        final = LNImpl
    return TransformerBlockSubmodules(layer_specs=layers[offset:offset + count], layer_norm=final), label
