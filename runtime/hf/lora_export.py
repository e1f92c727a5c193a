"""LoRA / DoRA checkpoints out to Hugging Face: merged full weights, or a PEFT adapter directory.

A recipec LoRA checkpoint holds the whole model: the frozen base weights under their usual keys
and, per adapted linear, `<linear>.adapter.linear_in.weight` (A, [r, in]),
`<linear>.adapter.linear_out.weight` (B, [out, r]) and for DoRA `<linear>.adapter.weight_magnitude`
(m, [out]); layers stacked on a prepended axis like the base weight, B and m of the gated fc1 in
the weight's [gate; up] row order (runtime/lora.py). The scale s = peft.lora_alpha / r comes from
the recipe the finetune ran with.

- Merged (`recipec convert mcore-to-hf --merge-lora`): `adapters_for_merge` takes the adapter
  tensors out of the keys convert.mcore_to_hf exports and `LoraMerge.merge` replaces each adapted
  base weight, as it is read, by W + s B A (DoRA: m * (W + s B A) / ||W + s B A|| per output row),
  computed in fp32 on Megatron's layout, before the family's weight mapping splits it. The
  result is a plain HF model: transformers computes what the adapter model computed.
- Adapter only (`--adapter-only`, `export_adapter`): PEFT's format, `adapter_config.json`
  (peft_type LORA, r, lora_alpha, use_dora, target_modules in HF names) and
  `adapter_model.safetensors` with `base_model.model.<hf module>.lora_A.weight`, `.lora_B.weight`
  and (DoRA) `.lora_magnitude_vector`. B and m go through the same transform as the base weight
  (the fused qkv's per-group interleave -> q, k, v rows; fc1 -> gate, up rows); A multiplies the
  input, which the split modules share, so each gets a copy. This is exact: q_proj's update is
  s B_q A, and DoRA's norm is per output row, so splitting rows splits the norms.
  `target_modules` holds short names (q_proj, ..., down_proj) as PEFT writes them. MoE experts have
  no adapters (runtime/lora.py); where an expert's module shares a short name with an adapted dense
  one (DeepSeek's gate_proj), PEFT gives it a fresh adapter, which computes nothing (B = 0; DoRA:
  m = ||W||) but is reported as missing from the file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from recipec.compiler.schema import RecipeConfig

from .mappings import ArchMapping, MappingError
from .reader import HFConvertError, is_hf_dir

log = logging.getLogger("recipec.runtime")

_A, _B, _M = "linear_in.weight", "linear_out.weight", "weight_magnitude"
_MARK = ".adapter."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _base_key(adapter_key: str) -> tuple[str, str] | None:
    """(base weight key, part) of an adapter checkpoint key; None for any other key."""
    head, mark, part = adapter_key.rpartition(_MARK)
    if not mark or part not in (_A, _B, _M):
        return None
    return head + ".weight", part


def pop_adapters(model_keys: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Remove the adapter tensors from `model_keys` (checkpoint key -> metadata) and return them
    grouped by the base weight they adapt: base key -> {part: metadata}."""
    found: dict[str, dict[str, Any]] = {}
    for key in [k for k in model_keys if _MARK in k]:
        parsed = _base_key(key)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = model_keys.pop(key)
    return found


def _check(found: dict[str, dict[str, Any]], model_keys: dict[str, Any], c: Any, step_dir: Path) -> tuple[float, bool]:
    """(scale s = alpha / r, is DoRA) after checking the checkpoint's adapters against the recipe."""
    p = c.peft
    dora = any(_M in parts for parts in found.values())
    kind = "DoRA" if dora else "LoRA"
    if p.method is None:
        raise HFConvertError(f"{step_dir} holds {kind} adapters, but the recipe's peft.method is unset: pass the "
                             "recipe the finetune ran with (its peft.lora_alpha / peft.lora_rank set the scale)")
    if (p.method == "dora") != dora:
        raise HFConvertError(f"{step_dir} holds {kind} adapters, but the recipe's peft.method is {p.method!r}: pass "
                             "the recipe the finetune ran with")
    for base, parts in sorted(found.items()):
        want = {_A, _B, _M} if dora else {_A, _B}
        if set(parts) != want or base not in model_keys:
            missing = sorted(want - set(parts)) + ([base] if base not in model_keys else [])
            raise HFConvertError(f"{step_dir}: the adapter of {base} is incomplete (no {', '.join(missing)}); is the "
                                 "checkpoint damaged?")
        rank = int(parts[_A].global_shape[-2])
        if rank != p.lora_rank:
            raise HFConvertError(f"{step_dir}: the adapters have rank {rank}, the recipe's peft.lora_rank is "
                                 f"{p.lora_rank}: pass the recipe the finetune ran with")
    return p.lora_alpha / p.lora_rank, dora


def _load(step_dir: Path, metas: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Whole (unsharded) checkpoint tensors, by the names of `metas`, in one read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from .convert import _reading

    state = {name: ShardedTensor.from_rank_offsets(meta.key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype),
                                                   replica_id=0) for name, meta in metas.items()}
    with _reading(step_dir):
        return dist_checkpointing.load(state, str(step_dir))


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + s B A, or DoRA's m * (W + s B A) / ||W + s B A|| (norm over each output row's inputs), in
    fp32 and returned in W's dtype; leading (layer) axes broadcast."""
    v = weight.float() + scale * (b.float() @ a.float())
    if magnitude is not None:  # the norm rounded to m's dtype, as the DoRA layer does (runtime/lora.py)
        norm = torch.linalg.vector_norm(v, dim=-1).to(magnitude.dtype)
        v = v * (magnitude / norm).float().unsqueeze(-1)
    return v.to(weight.dtype)


class LoraMerge:
    """A checkpoint's adapters, merged into their base weights as convert.mcore_to_hf reads them."""

    def __init__(self, step_dir: Path, found: dict[str, dict[str, Any]], scale: float, dora: bool) -> None:
        self.step_dir, self.found, self.scale, self.dora = step_dir, found, scale, dora

    def merge(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor `key` (whole, as read) with its adapter merged in; others unchanged."""
        parts = self.found.get(key)
        if parts is None:
            return tensor
        loaded = _load(self.step_dir, parts)
        return merged_weight(tensor, loaded[_A], loaded[_B], self.scale, loaded.get(_M))


def adapters_for_merge(model_keys: dict[str, Any], step_dir: Path, c: Any, merge: bool) -> LoraMerge | None:
    """For convert.mcore_to_hf: take the adapter tensors out of `model_keys` (in place) and return
    what merges them (None when the checkpoint has none). A checkpoint with adapters exports only
    with `merge` (--merge-lora) or through export_adapter (--adapter-only): never silently without them."""
    found = pop_adapters(model_keys)
    if not found:
        if merge:
            log.warning("--merge-lora: %s holds no LoRA/DoRA adapters; exporting its weights as they are", step_dir)
        return None
    if not merge:
        raise HFConvertError(f"{step_dir} holds LoRA/DoRA adapters (peft.method): pass --merge-lora for a model "
                             "with the adapters merged into its weights, or --adapter-only for a PEFT adapter "
                             "directory (adapter_config.json + adapter_model.safetensors)")
    scale, dora = _check(found, model_keys, c, step_dir)
    log.info("merging %d %s adapter(s) (scale %g) into the exported weights", len(found), "DoRA" if dora else "LoRA",
             scale)
    return LoraMerge(step_dir, found, scale, dora)


# ---------------------------------------------------------------- adapter only (PEFT)
def _module(hf_weight_name: str) -> str:
    if not hf_weight_name.endswith(".weight"):
        raise MappingError(f"{hf_weight_name}: an adapted weight should map to HF `<module>.weight` tensors")
    return hf_weight_name[: -len(".weight")]


def peft_tensors(mapping: ArchMapping, name: str, a: torch.Tensor, b: torch.Tensor,
                 magnitude: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one adapted Megatron weight `name` (module name, one layer): B (and m)
    split like the weight's output rows, A copied to each HF module the weight splits into."""
    out: dict[str, torch.Tensor] = {}
    bs = mapping.to_hf(name, b)
    ms = mapping.to_hf(name, magnitude) if magnitude is not None else {}
    rank = a.shape[0]
    for hf_name, piece in bs.items():
        if piece.dim() != 2 or piece.shape[1] != rank:
            raise MappingError(f"{name}: its HF transform does not split output rows ({hf_name} "
                               f"{tuple(piece.shape)}); adapters of this weight cannot be exported")
        module = _PEFT_PREFIX + _module(hf_name)
        out[f"{module}.lora_A.weight"] = a.clone()
        out[f"{module}.lora_B.weight"] = piece.contiguous()
        if magnitude is not None:
            out[f"{module}.lora_magnitude_vector"] = ms[hf_name].contiguous()
    return out


def adapter_config(c: Any, target_modules: Sequence[str], dora: bool) -> dict[str, Any]:
    """PEFT's LoraConfig fields for the recipe's adapters."""
    p = c.peft
    alpha = int(p.lora_alpha) if float(p.lora_alpha).is_integer() else p.lora_alpha
    pretrained = c.checkpoint.pretrained
    base = pretrained if pretrained and is_hf_dir(pretrained) else None
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
            "r": p.lora_rank, "lora_alpha": alpha, "lora_dropout": p.lora_dropout, "use_dora": dora,
            "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def export_adapter(ckpt_dir: str | Path, out: str | Path, *, recipe: str | None = None, overrides: Sequence[str] = (),
                   files: Sequence[str] = (), config: RecipeConfig | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) from the
    adapters of a LoRA/DoRA dist checkpoint; PeftModel.from_pretrained(base_model, out) loads it."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from ..logs import Progress, console
    from .convert import (
        _reading,
        compile_recipe,
        ensure_distributed,
        model_shape,
        resolve_checkpoint,
    )

    console()
    started = Progress("adapter export")
    step_dir = resolve_checkpoint(ckpt_dir)
    c = config if config is not None else compile_recipe(recipe, overrides, files, None)
    out = Path(out)
    created = ensure_distributed()
    try:
        with _reading(step_dir):
            metadata = dist_checkpointing.load_tensors_metadata(str(step_dir))
        model_keys = {k: v for k, v in metadata.items() if k.startswith("decoder.")}
        found = pop_adapters(model_keys)
        if not found:
            raise HFConvertError(f"{step_dir} holds no LoRA/DoRA adapters (no `.adapter.` tensors); --adapter-only "
                                 "exports the adapters of a peft.method run")
        scale, dora = _check(found, model_keys, c, step_dir)
        emb = metadata.get("embedding.word_embeddings.weight")
        padded = int(emb.global_shape[0]) if emb is not None else c.model.vocab_size
        mapping = ArchMapping(c.model.architecture, model_shape(c, padded))
        tensors: dict[str, torch.Tensor] = {}
        targets: dict[str, None] = {}  # HF short module names, in first-seen order
        for base in sorted(found):
            loaded = _load(step_dir, found[base])
            a, b, m = loaded[_A], loaded[_B], loaded.get(_M)
            axes = a.dim() - 2  # the layer axis Megatron prepends (none for per-layer keys)
            for index in itertools.product(*(range(n) for n in a.shape[:axes])):
                name = mapping.canonical_name(base, index)
                part = peft_tensors(mapping, name, a[index], b[index], m[index] if m is not None else None)
                tensors.update(part)
                targets.update({k.split(".lora_")[0].rsplit(".", 1)[-1]: None for k in part})
        out.mkdir(parents=True, exist_ok=True)
        tmp_weights, tmp_config = out / f".{ADAPTER_WEIGHTS}.tmp", out / f".{ADAPTER_CONFIG}.tmp"
        save_file(dict(sorted(tensors.items())), str(tmp_weights), metadata={"format": "pt"})
        tmp_config.write_text(json.dumps(adapter_config(c, list(targets), dora), indent=2) + "\n")
        os.replace(tmp_weights, out / ADAPTER_WEIGHTS)
        os.replace(tmp_config, out / ADAPTER_CONFIG)
        log.info("wrote %s: a PEFT %s adapter (r %d, alpha %g, scale %g; %d tensors for %s) in %s", out,
                 "DoRA" if dora else "LoRA", c.peft.lora_rank, c.peft.lora_alpha, scale, len(tensors),
                 ", ".join(targets), started.elapsed())
        return out
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
