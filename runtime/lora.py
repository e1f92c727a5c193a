"""LoRA adapters on Megatron-Core linears, tensor-parallel and checkpoint aware.

`apply_lora(chunks, c)` runs after the model is built and its base weights are loaded
(keyed init, `checkpoint.pretrained`, or a Hugging Face directory) and before mcore DDP and
the optimizer exist. It freezes every base parameter and gives each target linear

    y = base(x) + (alpha / r) * B(A(dropout(x)))

with A drawn like PEFT's kaiming-uniform and B zero, so step 0 computes the base model.

Targets are found by attribute path, never by class (local `ColumnParallelLinear` and TE's
`TELayerNormColumnParallelLinear` alike); the model family names them
(`RuntimeFamily.lora_targets`, runtime/families: name -> (path in a layer, column|row)), by
default `self_attention.linear_qkv`, `self_attention.linear_proj`, `mlp.linear_fc1`,
`mlp.linear_fc2` of every transformer layer. MoE experts (`mlp.experts.*`,
`mlp.shared_experts.*`) are left without adapters.

Tensor parallelism follows Megatron-Bridge's `ParallelLinearAdapter`:

- column-parallel bases (linear_qkv, linear_fc1): A is replicated `[r, in]`, B is
  column-sharded `[out/tp, r]` like the base weight; the rank-r activation enters the TP
  region with `copy_to_tensor_model_parallel_region` (identity forward, all-reduce of its
  gradient), exactly as the base's input does.
- row-parallel bases (linear_proj, linear_fc2): A is row-sharded over the input
  `[r, in/tp]`, B is replicated `[out, r]`; A's partial output is all-reduced over TP (a
  rank-r all-reduce instead of the base's hidden-size one; B applied after is the same sum).
- sequence parallelism: a column base's input is sequence-sharded, so A runs on the local
  sequence and its rank-r output is all-gathered (reduce-scatter backward); a row base's
  rank-r partial is reduce-scattered over the sequence instead of all-reduced. The
  replicated factor then sees only part of the sequence, so it is marked
  `sequence_parallel` and Megatron's `finalize_model_grads` sums its gradient over TP, as
  for layernorm weights.

The base keeps its `(output, bias)` contract. TE's fused layernorm-linears are asked for
their layernorm output (`return_layernorm_output`), which the adapter consumes, as Bridge
does; the local spec's separate norms need nothing.

DoRA (`peft.method = "dora"`, weight-decomposed LoRA; PEFT's `use_dora`) adds a trained
magnitude m per output row of the target: the layer computes

    y = m / ||W + s B A||_row * (W x + s B A dropout(x)) (+ the base's bias, unscaled)

with s = alpha / r and the norm over each output row's inputs (PEFT's `get_weight_norm`, dim 1
of the [out, in] weight), detached from the graph (DoRA paper section 4.3, as PEFT does). m
starts at ||W||_row, so with B = 0 step 0 is the base model again. Dropout acts on the low-rank
path only (PEFT also applies its mask to the W x that is rescaled; the two agree without
dropout and at eval, which is what an export computes). Under TP the norm is of the global row:
a column-parallel weight holds whole rows (m sharded like B), a row-parallel one holds a slice
of every row, so the squared partial sums are all-reduced over TP (m replicated like B). The
norm is a constant, so that all-reduce needs no backward.

Checkpoints: the adapters live at `<linear>.adapter.linear_in.weight` (A) and
`<linear>.adapter.linear_out.weight` (B), and DoRA's m at `<linear>.adapter.weight_magnitude`
(Megatron-Bridge's name), in the model's `sharded_state_dict`, as ShardedTensors with their TP
axis (the gated fc1's B and m as the gate/up halves, like the base fc1 weight), so checkpoints
reshard across TP/PP. The whole model is saved: base weights
(frozen, unchanged) next to the adapters, so a LoRA checkpoint resumes or exports on its
own without the pretrained checkpoint.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from . import families
from .sharded import sharded_tensors

log = logging.getLogger("recipec.runtime")


class LoRAAdapter(torch.nn.Module):
    """The two low-rank factors of one target; parameters `linear_in.weight` (A) and
    `linear_out.weight` (B), named as Megatron-Bridge names them; with `magnitude` (DoRA) also
    `weight_magnitude` (m, one per local output row; set by apply_lora from the base weight)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, mode: str, dtype: torch.dtype,
                 device: torch.device, magnitude: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.linear_in = torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.linear_out = torch.nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.linear_out.weight.zero_()
        a, b = self.linear_in.weight, self.linear_out.weight
        # Which factor is TP-sharded (grad-norm and optimizer bookkeeping read these attributes).
        tensor_parallel.set_tensor_model_parallel_attributes(a, mode == "row", 1, 1)
        tensor_parallel.set_tensor_model_parallel_attributes(b, mode == "column", 0, 1)
        if magnitude:  # sharded with the output rows, like B
            self.weight_magnitude = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            tensor_parallel.set_tensor_model_parallel_attributes(self.weight_magnitude, mode == "column", 0, 1)
        else:
            self.register_parameter("weight_magnitude", None)


def _lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    result = super(type(self), self).forward(x, *args, **kwargs)
    adapter_in = x
    if getattr(self, "return_layernorm_output", False):
        # TE layernorm-linear: ((out, ln_out), bias) without TE's own bias return, else (out, bias, ln_out).
        if len(result) == 3:
            out, bias, adapter_in = result
        else:
            (out, adapter_in), bias = result
    else:
        out, bias = result
    delta = self.adapter_delta(adapter_in)
    if self.adapter.weight_magnitude is None:
        return out + delta, bias
    return _dora_output(self, out, bias, delta), bias


def dora_weight_norm(self: Any) -> torch.Tensor:
    """||W + s B A|| per output row of the global weight (fp32, detached): this rank's rows."""
    lora = self.adapter
    with torch.no_grad():
        delta = lora.linear_out.weight.float() @ lora.linear_in.weight.float()
        squares = (self.weight.float() + self._lora_scale * delta).square().sum(dim=1)
        if lora.mode == "row" and parallel_state.get_tensor_model_parallel_world_size() > 1:
            # A row-parallel rank holds a slice of every row's inputs.
            dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        return squares.sqrt()


def _dora_output(self: Any, out: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A|| * (W x + s B A x), leaving a bias the base added into `out` unscaled (as PEFT)."""
    m = self.adapter.weight_magnitude
    # The norm in m's dtype, as PEFT keeps it: m = ||W|| at init then gives exactly 1 under bf16 too.
    scale = (m / dora_weight_norm(self).to(m.dtype)).to(out.dtype)
    added = None
    if bias is None:  # the base added its bias (if it has one) into `out`
        own = getattr(self, "bias", None)
        added = own if isinstance(own, torch.Tensor) and own.numel() else None
    if added is None:
        return scale * (out + delta)
    return scale * (out - added + delta) + added


def _adapter_delta(self: Any, x: torch.Tensor) -> torch.Tensor:
    lora = self.adapter
    sp = self._lora_sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1
    if self._lora_dropout > 0 and self.training:
        # A sharded input (row base, or sequence-sharded) draws its mask from the
        # model-parallel RNG stream, a replicated one from the default stream (same on all TP ranks).
        if lora.mode == "row" or sp:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = F.dropout(x, self._lora_dropout)
        else:
            x = F.dropout(x, self._lora_dropout)
    h = F.linear(x, lora.linear_in.weight)
    group = parallel_state.get_tensor_model_parallel_group()
    if lora.mode == "column":
        h = (tensor_parallel.gather_from_sequence_parallel_region(h, group=group) if sp
             else tensor_parallel.copy_to_tensor_model_parallel_region(h, group=group))
    else:
        h = (tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=group) if sp
             else tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=group))
    return F.linear(h, lora.linear_out.weight) * self._lora_scale


def _lora_sharded_state_dict(self: Any, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> Any:
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    sd = super(type(self), self).sharded_state_dict(prefix, sharded_offsets, metadata)
    sub = f"{prefix}adapter."
    for key in [k for k in sd if k.startswith(sub)]:
        del sd[key]  # the base made them replicated; replaced by the right layout below
    # Column: B and m (output rows) are TP-sharded; row: A (input columns) is, m is replicated.
    axis = ({"linear_out.weight": 0, "weight_magnitude": 0} if self.adapter.mode == "column"
            else {"linear_in.weight": 1})
    adapter_sd = make_sharded_tensors_for_checkpoint(
        self.adapter.state_dict(prefix="", keep_vars=True), sub, axis, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group())
    if self._lora_gated:
        # The gated fc1 holds [gate_shard; up_shard] per TP rank: save B (and m) as two halves, like the base weight.
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        for key in (f"{sub}linear_out.weight", f"{sub}weight_magnitude"):
            if key in adapter_sd:
                adapter_sd[key] = apply_swiglu_sharded_factory(
                    adapter_sd[key], sharded_offsets, bool((metadata or {}).get("singleton_local_shards", False)))
    sd.update(adapter_sd)
    return sd


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    """A subclass of the base linear's own class (isinstance checks keep working) that adds the adapter."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (cls,), {
            "forward": _lora_forward, "adapter_delta": _adapter_delta,
            "sharded_state_dict": _lora_sharded_state_dict, "_recipec_lora": True,
        })
    return _CLASSES[cls]


def _targets(chunk: torch.nn.Module, names: tuple[str, ...],
             table: Mapping[str, tuple[str, str]]) -> tuple[list[tuple[str, torch.nn.Module, str]], int]:
    """(qualified name, module, mode) of every target in `chunk`, and how many expert linears were skipped."""
    found, skipped = [], 0
    for qualified, module in chunk.named_modules():
        for name in names:
            path, mode = table[name]
            if qualified.endswith("." + path):
                found.append((qualified, module, mode))
            elif qualified.endswith("." + name) and (".experts." in qualified or ".shared_experts." in qualified):
                skipped += 1
    return found, skipped


def apply_lora(chunks: list[torch.nn.Module], c: Any) -> None:
    """Freeze the base model and add LoRA adapters to the targets (call before DDP)."""
    p = c.peft
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
    config = chunks[0].config
    table = families.get(c.model.architecture).lora_targets
    total, skipped = 0, 0
    for chunk in chunks:
        targets, n_skipped = _targets(chunk, tuple(p.target_modules), table)
        skipped += n_skipped
        for qualified, module, mode in targets:
            if getattr(module, "_recipec_lora", False):
                continue
            weight = module.weight
            out_features, in_features = weight.shape
            module.__class__ = _lora_class(type(module))
            module.adapter = LoRAAdapter(in_features, out_features, p.lora_rank, mode=mode,
                                         dtype=config.params_dtype, device=weight.device,
                                         magnitude=p.method == "dora")
            module._lora_scale = p.lora_alpha / p.lora_rank
            if module.adapter.weight_magnitude is not None:
                # m = ||W + s B A|| = ||W|| (B = 0): the base weights are loaded by now; a resume overwrites it.
                with torch.no_grad():
                    module.adapter.weight_magnitude.copy_(dora_weight_norm(module))
            module._lora_dropout = p.lora_dropout
            module._lora_sequence_parallel = bool(config.sequence_parallel)
            module._lora_gated = bool(config.gated_linear_unit) and qualified.endswith("mlp.linear_fc1")
            if hasattr(module, "return_layernorm_output"):  # TE layernorm-linear: hand out the normalized input
                module.return_layernorm_output = True
                if hasattr(module, "return_layernorm_output_gathered"):
                    module.return_layernorm_output_gathered = False
            if config.sequence_parallel:
                # The replicated factor sees only this rank's part of the sequence.
                replicated = module.adapter.linear_in.weight if mode == "column" else module.adapter.linear_out.weight
                replicated.sequence_parallel = True
                if mode == "row" and module.adapter.weight_magnitude is not None:
                    module.adapter.weight_magnitude.sequence_parallel = True
            total += 1
    if not total:
        raise RuntimeError(f"peft.target_modules={list(p.target_modules)} matched no linear layer of this model")
    if p.method == "dora":
        log.info(f"DoRA: a trained magnitude vector on each of the {total} adapted linear(s)")
    if skipped:
        log.info(f"LoRA: {skipped} MoE expert linear(s) left without adapters (experts are not adapted yet)")


def init_adapters(chunks: list[torch.nn.Module], seed: int) -> None:
    """Layout-independent adapter init: each global A drawn from a generator keyed by its
    checkpoint key (as runtime/init.py does for the base), this rank's shard taken by offset."""
    with torch.no_grad():
        for chunk in chunks:
            entries = [v for k, v in chunk.sharded_state_dict().items() if ".adapter.linear_in." in k]
            for sharded in sharded_tensors(entries):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(sharded.key.encode()))
                fan_in = sharded.global_shape[-1]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                full = (torch.rand(sharded.global_shape, generator=generator) * 2 - 1) * bound
                index: list[Any] = list(sharded.global_offset[: sharded.prepend_axis_num])
                for dim, offset in enumerate(sharded.global_offset[sharded.prepend_axis_num:]):
                    index.append(slice(offset, offset + sharded.data.shape[dim]))
                sharded.data.copy_(full[tuple(index)].to(sharded.data.dtype))


def parameter_counts(chunks: list[torch.nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model, summed over all ranks without replicas."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    dense_owner = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    try:
        expert_owner = parallel_state.get_expert_data_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - older/newer mcore without expert groups
        expert_owner = dense_owner
    counts = torch.zeros(2, dtype=torch.float64)
    seen: set[int] = set()
    for chunk in chunks:
        for param in chunk.parameters():
            if id(param) in seen or (getattr(param, "shared_embedding", False) and not first_stage):
                continue
            seen.add(id(param))
            expert = not getattr(param, "allreduce", True)
            if not (expert_owner if expert else dense_owner) or not param_is_not_tensor_parallel_duplicate(param):
                continue
            counts[1] += param.numel()
            if param.requires_grad:
                counts[0] += param.numel()
    if dist.is_initialized():
        device = next(chunks[0].parameters()).device
        counts = counts.to(device)
        dist.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())
