"""`recipec import-hf`: a Hugging Face config.json becomes a TOML recipe (and back).

Pure Python (json only): no torch, no transformers. The reverse direction,
`hf_config(model)`, is what `recipec convert mcore-to-hf` writes as config.json.

What a config.json means is its family's (compiler/families: `Family.import_hf` / `export_hf`,
found by `model_type`); this module reads the file, dispatches, checks the values against the
schema and writes the recipe. Every architecture field of the HF config is either mapped onto `[model]` or,
when recipec cannot express it (sliding-window attention, a RoPE scaling type
the runtime lacks, attention/MLP biases Megatron cannot reproduce, an unknown
model_type ...), rejected with an `HFImportError` that names the HF field.
Both transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`) spellings are read.

The weights' dtype becomes `precision.dtype` (float32 -> fp32, bfloat16 -> bf16, float16 -> fp16;
a config.json without one means float32, as transformers loads it), so `recipec convert
hf-to-mcore` and `mcore-to-hf` with the imported recipe give back the same bits. Any other
value is an HFImportError naming the field.

config.json is data from anywhere: every field is read through `HFConfig` (typed,
finite, in range), the recipe is written only through the TOML writer (values
escaped, comments on one line), and the result is compiled before it is returned,
so import-hf gives a recipe that builds or an HFImportError naming the field.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from . import families
from .errors import Problem, RecipeError
from .families import Family, ModelFields
from .hf_fields import HFConfig, HFImportError, fail, read_hf_config
from .render import toml_document
from .schema import ModelConfig
from .schema._fields import check_value
from .text import shown

__all__ = ["HF_DTYPES", "HFImportError", "hf_config", "model_fields", "precision_dtype", "read_hf_config",
           "recipe_from_hf", "tokenizer_files"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# config.json's dtype names (those transformers accepts: getattr(torch, name)) -> precision.dtype.
HF_DTYPES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def _family_of(c: HFConfig) -> Family:
    """The family that imports config.json's model_type (compiler/families); else an HFImportError."""
    model_type = c.text("model_type", None)
    family = families.for_hf_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise fail("model_type", f"model_type {shown(repr(model_type))} has no recipec mapping",
                   hint=f"supported: {', '.join(families.hf_model_types())}")
    return family


def model_fields(cfg: dict[str, Any]) -> tuple[dict[str, Any], Family]:
    """(`[model]` values, the family) for an HF config; raises HFImportError naming the field."""
    m, family = _map(cfg)
    return dict(m), family


def _map(cfg: dict[str, Any]) -> tuple[ModelFields, Family]:
    c = HFConfig(cfg)
    family = _family_of(c)
    m = ModelFields()
    m.put("architecture", family.name)
    family.import_hf(c, m)
    _check_schema(m)
    return m, family


def _check_schema(m: ModelFields) -> None:
    """Each mapped value against the schema's own types and bounds, naming the config.json field."""
    fields = {f.name: f for f in ModelConfig.__attrs_attrs__}
    for key, value in m.items():
        problem = check_value(fields[key], value)
        if problem is not None:
            field = m.fields.get(key, key)
            raise fail(field, f"{field} gives model.{key}, which {problem}")


def precision_dtype(cfg: dict[str, Any]) -> tuple[str, str]:
    """(precision.dtype, why) for an HF config: its weights' dtype, so conversion is lossless.

    transformers 5 writes `dtype`, 4.x `torch_dtype`; a file with both must agree (each version
    reads a different one). Without either, transformers loads the model in float32: so does recipec."""
    c = HFConfig(cfg)
    new, old = c.choice("dtype", HF_DTYPES, None), c.choice("torch_dtype", HF_DTYPES, None)
    if new is not None and old is not None and new != old:
        raise fail("dtype", f"dtype = {_json_name(cfg['dtype'])} and torch_dtype = {_json_name(cfg['torch_dtype'])} "
                   "disagree", hint="transformers 5 reads dtype and 4.x torch_dtype: give both the weights' dtype")
    if new is None and old is None:
        return "fp32", "config.json names none, and transformers loads such a model in float32"
    field = "dtype" if new is not None else "torch_dtype"
    return new or old, f"config.json {field} = {_json_name(cfg[field])}"


def _json_name(value: str) -> str:
    """A dtype name already checked against HF_DTYPES, quoted as JSON writes it."""
    return f'"{value}"'


def tokenizer_files(directory: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


def recipe_from_hf(path: str | Path, *, base: str = "pretrain", name: str | None = None) -> str:
    """TOML recipe text for the HF model at `path` (a directory or its config.json)."""
    if base not in ("pretrain", "finetune"):
        raise HFImportError(f"unknown base {shown(repr(base))}; use pretrain or finetune")
    cfg, directory = read_hf_config(path)
    m, fam = _map(cfg)
    fields, sources = dict(m), dict(m.fields)
    model_type = cfg["model_type"]
    architectures = HFConfig(cfg).texts("architectures")
    if architectures is not None and (not architectures or not all(architectures)):
        raise fail("architectures", f"architectures must name the model class, got {shown(repr(architectures))}")
    family = fam.base_for(fields)
    directory = directory.resolve()
    toks = tokenizer_files(directory)
    # the finetune base goes after the model (see _base/finetune.toml)
    extends = ["_base/pretrain", family] if base == "pretrain" else [family, "_base/finetune"]
    fields.setdefault("seq_length", min(4096, fields.get("max_position_embeddings", 4096)))
    sources.setdefault("seq_length", "max_position_embeddings")
    dtype, dtype_note = precision_dtype(cfg)
    doc: dict[str, Any] = {"extends": extends, **({"name": name} if name else {}), "model": fields,
                           "precision": {"dtype": dtype}}
    if toks:
        doc["tokenizer"] = {"type": "huggingface", "path": str(directory)}
    if base == "finetune":
        doc["checkpoint"] = {"pretrained": str(directory)}
    header = [f"Imported by `recipec import-hf` from {shown(str(directory / 'config.json'))}",
              f"(model_type {model_type!r}, {shown((architectures or ['?'])[0], 80)}).",
              "Every [model] field and precision.dtype come from that config.json; the rest from the bases."]
    notes = {"precision": [f"the weights' dtype ({dtype_note}),",
                           "so `recipec convert` both ways is bit-exact; bf16 trains faster on GPUs but rounds fp32 weights."],
             "tokenizer": [f"tokenizer files found: {', '.join(toks)}"]}
    text = toml_document(doc, header, notes)
    _check_compiles(text, sources)
    return text


def _check_compiles(text: str, sources: dict[str, str]) -> None:
    """Compile the generated recipe as `recipec build` will; its errors become HFImportErrors naming
    the config.json field each [model] key came from."""
    from .api import build

    with tempfile.TemporaryDirectory(prefix="recipec-import-") as tmp:
        recipe = Path(tmp) / "imported.toml"
        recipe.write_text(text, encoding="utf-8")
        try:
            build(recipe, artifact_dir=str(Path(tmp) / "build"))
        except RecipeError as exc:
            problems = []
            for p in exc.problems:
                key = p.key or ""
                field = sources.get(key.removeprefix("model."), "") if key.startswith("model.") else ""
                problems.append(Problem(HFImportError, f"the imported recipe does not compile: [{key}] {p.message}",
                                        key=f"config.json:{field}" if field else (key or None), hint=p.hint))
            raise HFImportError(problems) from None


def hf_config(model: Any, *, dtype: str = "float32", token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json (transformers 4.x/5.x readable) for a derived recipec ModelConfig.

    `dtype` is the exported weights' (written as both `dtype`, which transformers 5 reads, and
    `torch_dtype`, which 4.x reads); `token_ids` the `bos/eos/pad_token_id` of the recipe's tokenizer
    (runtime/hf/export_files.py), which generate() and pipelines read from here. The keys of the
    model itself are the family's (compiler/families: Family.export_hf)."""
    if dtype not in HF_DTYPES:
        raise HFImportError(f"dtype {dtype!r} has no Hugging Face export name; use float32, bfloat16 or float16")
    try:
        family = families.get(model.architecture)
    except RecipeError:
        raise HFImportError(f"model.architecture {model.architecture!r} has no Hugging Face export mapping") from None
    if not family.hf_model_types:
        raise HFImportError(f"model.architecture {model.architecture!r} has no Hugging Face export mapping")
    cfg: dict[str, Any] = {"architectures": [family.hf_class], "model_type": family.hf_model_types[0]}
    family.export_hf(model, cfg)
    cfg.update({"dtype": dtype, "torch_dtype": dtype, "use_cache": True, **(token_ids or {})})
    return cfg
