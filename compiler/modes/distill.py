"""train.mode = "distill": knowledge distillation from a frozen teacher (torch-free half).

The student is the recipe's [model]; the teacher is a second model of the same family and
tokenizer, possibly larger, loaded read-only from `teacher_load` (an HF directory or a recipec
checkpoint) and laid out like the student (same TP/EP). Its keys live in [train.mode_options]:

    [train.mode_options]
    teacher_load = "/ckpt/Llama-3.1-8B"   # HF dir (config.json + *.safetensors) or a recipec checkpoint
    temperature = 1.0                     # T: KL between softmax(teacher / T) and softmax(student / T)
    kd_weight = 0.5                       # loss = (1 - w) * LM loss + w * T^2 * KL
    teacher_num_layers = 32               # teacher_<field>: the teacher's model.<field> ...
    teacher_hidden_size = 4096            # ... every other field is the student's [model] value

Why flat `teacher_<field>` keys and not a `[train.mode_options.teacher.model]` table: the
free table [train.mode_options] holds scalar values only (the schema, compiler/schema/training.py),
and a flat key keeps each value's file:line provenance and `recipec explain` as they are. The
teacher's model is the student's [model] with these keys applied. A derived size (ffn_hidden_size,
kv_channels, moe_ffn_hidden_size) whose inputs the teacher changes is derived again from the
teacher's values unless set (teacher_hidden_size = 4096 alone gives kv_channels 4096 / heads and
ffn 4 x 4096); one whose inputs it keeps stays the student's. The teacher is checked by the same
ModelConfig validators and head/layer rules as [model]. Teacher and student share the
tokenizer: the same vocab_size, padding and seq_length, else the recipe is refused (and at run
time, an HF directory or checkpoint of another shape is refused by the loaders, exit 2).

The data is the recipe's: jsonl records (data.kind "sft": KL and LM loss on the response tokens,
packing allowed) or pretraining text (every token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from ..schema import ModelConfig
from ..schema._fields import check_value, option
from .base import ExtraModel

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import Finding

PREFIX = "teacher_"
OPTIONS = "train.mode_options"
# Teacher fields that must equal the student's: the tokens both models read are one stream.
SHARED = ("vocab_size", "make_vocab_size_divisible_by", "seq_length")


def _teacher_field(field: attrs.Attribute) -> Any:
    """An optional teacher_<name> option mirroring model.<name>: same type, bounds and choices."""
    meta = {k: v for k, v in field.metadata.items() if k != "derived"}
    meta["help"] = f"The teacher's model.{field.name} (unset: the student's" + (
        ", derived again if the teacher changes its inputs)" if _rederived(field) else ")") + ". " + field.metadata["help"]
    tp = field.type if (field.type is Any or type(None) in getattr(field.type, "__args__", ())) else field.type | None

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        problem = check_value(attribute, value)
        if problem is not None:
            raise ValueError(f"{OPTIONS}.{attribute.name}: {problem}")

    return attrs.field(default=None, kw_only=True, type=tp, metadata=meta, validator=check)


def _rederived(field: attrs.Attribute) -> bool:
    """A size derived from the widths (ffn_hidden_size, kv_channels, moe_ffn_hidden_size)."""
    return "hidden_size" in field.metadata.get("derived", "")


def _inputs(field: attrs.Attribute) -> set[str]:
    """The model fields a derived field's formula names ("hidden_size / num_attention_heads")."""
    return set(re.findall(r"[a-z_]+", field.metadata.get("derived", "")))


_MODEL_FIELDS = attrs.fields(attrs.resolve_types(ModelConfig))


@attrs.frozen
class _LossOptions:
    """The distillation keys proper; DistillOptions adds one teacher_<field> per model field."""

    teacher_load: str = option(
        "", "The teacher's weights, read-only: a Hugging Face directory (config.json + *.safetensors) or a "
        "recipec checkpoint directory (iter_*/ from a run or `recipec convert hf-to-mcore`).")
    temperature: float = option(1.0, "Softmax temperature T of both models' logits in the KL term.",
                                min=1e-3, max=100.0)
    kd_weight: float = option(
        0.5, "Weight w of the distillation term: loss = (1 - w) * LM loss + w * T^2 * KL(teacher || student).",
        min=0.0, max=1.0)


# Field types as objects, not the strings `from __future__ import annotations` leaves: the
# validators check values against them when the runtime builds the options.
attrs.resolve_types(_LossOptions)
DistillOptions = attrs.make_class(
    "DistillOptions", {PREFIX + f.name: _teacher_field(f) for f in _MODEL_FIELDS}, bases=(_LossOptions,), frozen=True)
attrs.resolve_types(DistillOptions)
DistillOptions.__doc__ = "[train.mode_options] of train.mode = \"distill\" (see compiler/modes/distill.py)."


def teacher_overrides(config: RecipeConfig) -> dict[str, Any]:
    """The teacher_<field> keys the recipe sets, as {model field: value}."""
    fields = {f.name for f in _MODEL_FIELDS}
    return {k[len(PREFIX):]: v for k, v in config.train.mode_options.items()
            if k.startswith(PREFIX) and k[len(PREFIX):] in fields}


def teacher_model(config: RecipeConfig) -> ModelConfig:
    """The teacher's [model]: the student's with the teacher_<field> keys applied; a derived size
    whose inputs the teacher changes (and does not set itself) is derived again from the teacher's.
    Raises ValueError (a model validator's message) when the result is not a valid model."""
    from ..schema.model import derive_model

    overrides = teacher_overrides(config)
    changed, again = set(overrides), {}
    for f in _MODEL_FIELDS:  # declaration order: ffn_hidden_size before moe_ffn_hidden_size
        if _rederived(f) and f.name not in overrides and _inputs(f) & changed:
            again[f.name] = None
            changed.add(f.name)
    return derive_model(attrs.evolve(config.model, **again, **overrides))


def teacher_config(config: RecipeConfig) -> RecipeConfig:
    """The whole recipe with the teacher's [model] (how the runtime builds it under the same layout)."""
    return attrs.evolve(config, model=teacher_model(config))


def _key(key: str) -> str:
    """A finding of a [model] rule, moved to the teacher's key."""
    return f"{OPTIONS}.{PREFIX}{key[len('model.'):]}" if key.startswith("model.") else key


class Distill:
    name = "distill"
    options = DistillOptions

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        from . import mode_for

        mo, p = config.train.mode_options, config.parallel
        if not mo.get("teacher_load"):
            yield (f"{OPTIONS}.teacher_load", "train.mode \"distill\" needs the teacher's weights",
                   f"set {OPTIONS}.teacher_load to an HF directory or a recipec checkpoint directory")
        if p.pipeline_model_parallel_size > 1:
            yield ("parallel.pipeline_model_parallel_size", (
                f"distillation runs the teacher beside each student microbatch on the last stage; pipeline "
                f"parallelism ({p.pipeline_model_parallel_size} stages) is not supported for it yet"),
                "set parallel.pipeline_model_parallel_size=1 (use tensor or data parallelism)")
        if p.context_parallel_size > 1:
            yield ("parallel.context_parallel_size", (
                f"distillation with context parallelism ({p.context_parallel_size}) is not supported yet"),
                "set parallel.context_parallel_size=1")
        if config.model.mtp_num_layers:
            yield ("model.mtp_num_layers", "distillation has no multi-token-prediction loss for the student",
                   "unset model.mtp_num_layers (~model.mtp_num_layers)")
        # The data rules of the mode whose data this run reads (sft records or pretraining text).
        yield from mode_for("sft" if config.data.kind == "sft" else "pretrain").rules(config)
        yield from self._teacher_rules(config)

    def _teacher_rules(self, config: RecipeConfig) -> Iterator[Finding]:
        from .. import validate

        overrides = teacher_overrides(config)
        for name in SHARED:
            if name in overrides and overrides[name] != getattr(config.model, name):
                yield (f"{OPTIONS}.{PREFIX}{name}", (
                    f"the teacher's {name} is {overrides[name]!r} but the student's model.{name} is "
                    f"{getattr(config.model, name)!r}: teacher and student must share the tokenizer and read the "
                    "same token sequences"), f"remove {OPTIONS}.{PREFIX}{name} (the student's value is used)")
        if any(check_value(a, config.train.mode_options[a.name]) for a in attrs.fields(DistillOptions)
               if a.name in config.train.mode_options):
            return  # a bad value is reported by the option check already
        try:
            teacher = teacher_config(config)
        except (ValueError, TypeError) as exc:
            yield (f"{OPTIONS}.{PREFIX}num_layers" if not overrides else f"{OPTIONS}.{PREFIX}{min(overrides)}",
                   f"the teacher's model is not valid: {exc}", None)
            return
        for rule in (validate.family, validate.heads, validate.layers):
            for key, message, hint in rule(teacher):
                yield (_key(key), f"teacher: {message}", hint)

    def extra_models(self, config: RecipeConfig) -> Iterable[ExtraModel]:
        try:
            return (ExtraModel(role="teacher", model=teacher_model(config)),)
        except (ValueError, TypeError):
            return ()  # an invalid teacher is reported by rules(); no estimate without it


MODE = Distill()
