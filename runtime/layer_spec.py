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
from typing import Any, Callable

from megatron.core.transformer.spec_utils import ModuleSpec

from recipec.compiler.errors import RecipeError

from .attention import SDPAttention

TE_LABEL = "transformer_engine"
LOCAL_LABEL = "local+sdpa"


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
) -> tuple[ModuleSpec, str]:
    """Return ``(transformer layer spec, label)`` where label is "transformer_engine" or
    "local+sdpa".  ``normalization`` is "LayerNorm" or "RMSNorm" (the TE spec takes it
    from the TransformerConfig instead, so it is only forwarded where accepted).

    ``impl`` is model.transformer_impl (see `uses_transformer_engine`); "transformer_engine"
    without TE is an error rather than a silent switch to the slower path.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    kwargs = dict(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    if uses_transformer_engine(impl, torch_compile):
        return _call_supported(specs.get_gpt_layer_with_transformer_engine_spec, specs, **kwargs), TE_LABEL

    spec = copy.deepcopy(_call_supported(specs.get_gpt_layer_local_spec, specs, **kwargs))
    attn = spec.submodules.self_attention
    if not hasattr(attn.submodules, "core_attention"):
        raise TypeError(f"unexpected local attention spec: {attn!r}")
    attn.submodules.core_attention = SDPAttention
    return spec, LOCAL_LABEL
