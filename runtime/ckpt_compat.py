"""Whether a checkpoint was trained as the model this run builds, decided before anything loads.

Why: relaunching a recipe whose `[model]` changed (more layers, a wider model) into a run
directory that holds an older model's checkpoints used to fail deep inside Megatron's loader
with a 94-line CheckpointingException, and the loader's fallback then renamed every good
checkpoint `iter_N.bad`, because a load failure looked like corruption. A model change is the
user's choice, not damage: it stops the run (exit 2) with the keys that differ, old -> new,
and never touches the checkpoints.

Every manifest records the `[model]` section it was trained with (resolved, so derived values
are explicit) and the padded vocabulary size (which also depends on the tensor-parallel size).
On resume the saved record is compared with this run's, key by key, in three classes:

- STRUCTURE keys decide which tensors exist and their shapes. A change cannot load: refuse.
- QUIET keys change how the model is computed, stored or initialised, or only the training
  objective's regularisers, never the function the trained weights compute: ignored.
- Every other key (rotary_base, rotary_percent, rope scaling, seq_length, norm_epsilon,
  activation, vocab_size, moe_router_topk, and any key added later) loads into the same
  tensors but changes the math. These warn, once, naming old -> new, and the run continues.
  They are not refused because continued training changes them on purpose: long-context
  extension raises rotary_base and seq_length mid-run (as Llama 3.1 and Qwen2.5 did), and a
  refusal would force a restart from bare weights that loses the optimizer state and the step
  count. A user who did not mean it sees the warning at the first line of the resume.

Manifests from before this record (and `recipec convert` checkpoints) lack it; for those the
loader recognises Megatron's own shape and key mismatch errors (`is_model_mismatch`) after the
files verified intact, so the same change is reported the same way instead of marked bad.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from shlex import quote
from typing import Any

from recipec.compiler.errors import RecipeError
from recipec.compiler.render import config_to_dict
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.text import clip

PADDED_VOCAB = "padded_vocab_size"

STRUCTURE = frozenset({
    "architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "gated_linear_unit", "position_embedding_type",
    "share_embeddings_and_output_weights", "qk_layernorm", "add_bias_linear", "add_qkv_bias", "num_moe_experts",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", PADDED_VOCAB,
    # Generic features that add, drop or reshape tensors (recipec issue 12).
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "softmax_type", "sandwich_norm", "moe_first_k_dense", "moe_router_enable_expert_bias", "mtp_num_layers",
})
QUIET = frozenset({
    "transformer_impl", "init_method_std", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "hidden_dropout", "attention_dropout",
    "moe_aux_loss_coeff", "moe_router_load_balancing_type", "make_vocab_size_divisible_by",
    "moe_router_bias_update_rate", "mtp_loss_scaling_factor",
})

# Megatron-Core's and torch's words for "these tensors do not fit this model" (dist_checkpointing's
# validation, load_state_dict(strict=True)); after the hashes verified, they never mean damage.
_MISMATCH = re.compile(r"Global shape mismatch|size mismatch for|Missing key|Unexpected key|missing keys|"
                       r"unexpected keys|not found in the checkpoint|Missing (global )?shards", re.IGNORECASE)


class ModelChangeError(RecipeError):
    """The checkpoint to resume holds another model; nothing was loaded and nothing is changed."""


def model_record(config: RecipeConfig, padded_vocab_size: int) -> dict[str, Any]:
    """What a manifest stores about the model: the resolved `[model]` section (JSON values)."""
    return {"model": config_to_dict(config)["model"], PADDED_VOCAB: padded_vocab_size}


def _flat(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The saved model keys of a manifest (the padded vocabulary too), or None if it has none."""
    model = meta.get("model")
    flat = dict(model) if isinstance(model, dict) else {}
    if isinstance(meta.get(PADDED_VOCAB), int):
        flat[PADDED_VOCAB] = meta[PADDED_VOCAB]
    return flat or None


def differences(saved_meta: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]],
                                                                             dict[str, tuple[Any, Any]]]:
    """({structure key: (old, new)}, {math key: (old, new)}) over the keys both records have."""
    old, new = _flat(saved_meta), _flat(now)
    if old is None or new is None:
        return {}, {}
    changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    learned = "learned_absolute" in (old.get("position_embedding_type"), new.get("position_embedding_type"))
    structure = {k: v for k, v in changed.items()
                 if k in STRUCTURE or (k == "max_position_embeddings" and learned)}
    math = {k: v for k, v in changed.items() if k not in structure and k not in QUIET}
    return structure, math


def _key(name: str) -> str:
    if name == PADDED_VOCAB:
        return "padded vocabulary (model.vocab_size rounded up to model.make_vocab_size_divisible_by x " \
               "parallel.tensor_model_parallel_size)"
    return f"model.{name}"


def _value(value: Any) -> str:
    """A value as TOML would spell it; JSON-escaped, since a manifest is a file anyone may edit."""
    return "(unset)" if value is None else clip(json.dumps(value, ensure_ascii=True), 80)


def describe(changes: dict[str, tuple[Any, Any]], sep: str = ", ") -> str:
    return sep.join(f"{_key(k)}: {_value(old)} -> {_value(new)}" for k, (old, new) in changes.items())


def ways_out(root: Path, source: str, named: bool = True) -> str:
    """What a user can do, for the config key that pointed the run at `root`."""
    old = "its model (the values before ->)" if named else "the model it was trained with"
    if source == "checkpoint.save":
        return (f"to train this model, give it its own directory (launch.output_dir=... checkpoint.save=...), "
                f"or start it fresh here by moving the old run away (mv {quote(str(root))} "
                f"{quote(str(root) + '.old')}); to continue the old run, relaunch with {old}")
    return (f"point {source} at a checkpoint of this model, or unset {source} to start without it; to continue "
            f"the old run, relaunch with {old}")


def refusal(directory: Path, source: str, structure: dict[str, tuple[Any, Any]]) -> ModelChangeError:
    return ModelChangeError(
        f"{directory} ({source}) holds a checkpoint of another model, which cannot load into this one; nothing "
        "was loaded and the checkpoint is left as it is. Saved -> this recipe:\n   "
        + describe(structure, "\n   ") + "\n   hint: " + ways_out(directory.parent, source))


def mismatch_refusal(directory: Path, source: str, detail: str, *, recorded: bool) -> ModelChangeError:
    """Megatron's own words about the tensor that does not fit, when the model record cannot say more:
    the manifest predates it, or the [model] keys match and something else changed the tensors."""
    why = ("the [model] keys match the saved ones, so something else changed the checkpoint's tensors (peft.*, "
           "optimizer.optimizer or its sharding, a family's layers)" if recorded else "its manifest predates recipec's model record, so the differing "
           "[model] keys cannot be named")
    return ModelChangeError(
        f"{directory} ({source}) holds a checkpoint whose tensors do not fit this model: {detail}\n   "
        f"{why}: compare with the resolved.toml of the run that wrote it. Nothing was loaded and the checkpoint "
        "is left as it is.\n   hint: " + ways_out(directory.parent, source, named=False))


def is_model_mismatch(problem: str) -> bool:
    """Whether a load failure's text is a shape or key mismatch (the model's doing, not the files')."""
    return bool(_MISMATCH.search(problem))


def warning(directory: Path, math: dict[str, tuple[Any, Any]]) -> str:
    return (f"the model changed since {directory.name} (saved -> now: {describe(math, '; ')}); the weights load, "
            "but compute differently now (meant for, e.g., long-context extension; if not, relaunch with the saved "
            "values)")
