"""What an HF export needs besides its weights: config.json, generation_config.json, tokenizer files.

`recipec convert mcore-to-hf` is done when `AutoModelForCausalLM.from_pretrained(out)`,
`AutoTokenizer.from_pretrained(out)` and `model.generate` work on the directory alone, offline.
So the export carries, from the recipe's tokenizer (built as training built it, runtime/tokenizer.py):

- `bos/eos/pad_token_id` in config.json and generation_config.json. eos and pad are the ids the
  runtime ended documents and padded with (`eod`, `pad`), which is what the model learned;
  the `null` tokenizer (ids are the data) has none to give;
- generation_config.json: greedy decoding (`do_sample = false`) unless the tokenizer directory
  holds the source model's own generation_config.json, whose sampling defaults (and an eos
  list, as Llama 3 Instruct stops on several ids) are kept when they are well-formed;
- the tokenizer files of an HF tokenizer directory (only tokenizer files: that directory is often
  the source model's, and its weights or config.json must not overwrite the export's).

Everything read from the tokenizer is read by `plan_export`, before any weight is written, so a
missing tokenizer directory fails fast with an HFConvertError naming `tokenizer.path`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipec.compiler.hf_import import hf_config
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.text import shown

from .reader import HFConvertError

log = logging.getLogger("recipec.runtime")

# What save_pretrained writes for a tokenizer (fast, sentencepiece, BPE and WordPiece vocabularies,
# chat templates); never config.json, weights or anything else in the directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
_MAX_GENERATION_BYTES = 2**20  # a generation_config.json is a few hundred bytes
# Sampling defaults kept from a source generation_config.json, with the check each value must pass.
_SAMPLING: dict[str, Any] = {
    "do_sample": lambda v: isinstance(v, bool),
    "temperature": lambda v: _number(v) and v > 0,
    "top_p": lambda v: _number(v) and 0 < v <= 1,
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "repetition_penalty": lambda v: _number(v) and v > 0,
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ExportPlan:
    """What the export writes besides the weights, all read up front."""

    token_ids: dict[str, int]  # bos/eos/pad_token_id the tokenizer defines (absent ones left out)
    generation: dict[str, Any]  # generation_config.json
    tokenizer_dir: Path | None  # an HF tokenizer directory to copy TOKENIZER_FILES from


def plan_export(c: RecipeConfig) -> ExportPlan:
    """The export's token ids, generation config and tokenizer source for the recipe `c`."""
    tok = c.tokenizer
    directory = None
    if tok.type == "huggingface":
        directory = Path(tok.path) if tok.path else None
        if directory is None or not directory.is_dir():
            raise HFConvertError(f"tokenizer.path = {tok.path!r} is not a directory: the export needs the "
                                 "recipe's tokenizer (its token ids and files); pass the tokenizer directory the model "
                                 "was trained with (tokenizer.path=DIR), or tokenizer.type=null to export weights only")
    ids = token_ids(c)
    return ExportPlan(ids, generation_config(ids, directory), directory)


def token_ids(c: RecipeConfig) -> dict[str, int]:
    """{bos,eos,pad}_token_id of the recipe's tokenizer, each inside the model's vocabulary."""
    from recipec.runtime.tokenizer import HFTokenizer, build_tokenizer

    if c.tokenizer.type == "null":
        return {}
    try:
        tok = build_tokenizer(c)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError ... from transformers: the directory's fault
        raise HFConvertError(f"tokenizer.path = {c.tokenizer.path!r} cannot be loaded as a Hugging Face tokenizer "
                             f"({type(exc).__name__}: {shown(str(exc).strip(), 300)}); point tokenizer.path at the "
                             "directory the model was trained with") from None
    bos = tok.hf.bos_token_id if isinstance(tok, HFTokenizer) else None
    ids = {"bos_token_id": bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}
    vocab = c.model.vocab_size
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab:
            raise HFConvertError(f"the recipe's {c.tokenizer.type} tokenizer has {name} {value}, outside the model's "
                                 f"vocabulary (model.vocab_size = {vocab}); export with the tokenizer the model was "
                                 "trained with")
    if tok.vocab_size > vocab:
        log.warning("the tokenizer has %d tokens, the model's vocabulary %d: ids above %d have no embedding",
                    tok.vocab_size, vocab, vocab - 1)
    return {k: v for k, v in ids.items() if v is not None}


def generation_config(ids: dict[str, int], source: Path | None) -> dict[str, Any]:
    """generation_config.json: greedy, or the source model's sampling defaults; the tokenizer's ids."""
    gen: dict[str, Any] = {"do_sample": False}
    found = _source_generation(source / GENERATION_CONFIG) if source is not None else {}
    gen.update({k: v for k, v in found.items() if k in _SAMPLING and _SAMPLING[k](v)})
    gen.update(ids)
    stops = found.get("eos_token_id")
    eos = ids.get("eos_token_id")
    if (eos is not None and isinstance(stops, list) and eos in stops
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stops)):
        gen["eos_token_id"] = stops  # several stop ids (Llama 3 Instruct): keep them all
    return gen


def _source_generation(path: Path) -> dict[str, Any]:
    """A source generation_config.json as a dict; {} (with a warning) when it is absent or unreadable."""
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_GENERATION_BYTES + 1)
        data = json.loads(raw.decode("utf-8")) if len(raw) <= _MAX_GENERATION_BYTES else None
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        log.warning("%s is not a readable generation config: the export gets greedy decoding defaults", path)
        return {}
    return data


def write_export_files(out: Path, plan: ExportPlan, c: RecipeConfig, dtype: str) -> list[str]:
    """config.json, generation_config.json and the tokenizer files into `out`; the names written."""
    config = hf_config(c.model, dtype=dtype, token_ids=plan.token_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / GENERATION_CONFIG).write_text(json.dumps(plan.generation, indent=2, sort_keys=True) + "\n")
    written = ["config.json", GENERATION_CONFIG]
    if plan.tokenizer_dir is not None:
        written += copy_tokenizer_files(plan.tokenizer_dir, out)
    return written


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Copy TOKENIZER_FILES present in src (symlinks followed, as the HF cache uses them) into out."""
    names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in names:
        target = out / name
        if target.exists() and os.path.samefile(src / name, target):
            continue  # exporting into the tokenizer's own directory
        try:
            shutil.copyfile(src / name, target)
        except OSError as exc:
            raise HFConvertError(f"cannot copy the tokenizer file {src / name} to {out}: "
                                 f"{exc.strerror or exc}") from None
    return names
