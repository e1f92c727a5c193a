"""`recipec convert ...`: imported by compiler/cli.py only when the command runs (it needs torch).

The boundary is the CLI's (`_user_errors`: a RecipeError or a file-caused error is one message and
exit 2, a bug keeps its traceback); what convert reads (config.json, the safetensors index and
shards, checkpoints) is validated where it is read (runtime/hf/reader.py, mappings.py, convert.py).
Before anything is read, `main` makes every checkpoint load weights-only (runtime/safe_load.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from recipec.compiler.cli_base import (
    files as _files,  # the CLI's one set of conventions
)
from recipec.compiler.cli_base import overrides as _overrides
from recipec.compiler.cli_base import user_errors as _user_errors
from recipec.compiler.errors import RecipeError

if TYPE_CHECKING:
    from .convert import Compiler


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def convert() -> None:
    """Convert weights between Hugging Face directories and recipec/Megatron dist checkpoints."""


@convert.command("hf-to-mcore")
@click.argument("hf_dir")
@_overrides
@click.option("--recipe", metavar="R.toml|NAME", help="Recipe describing the model (default: what import-hf makes).")
@_files
@click.option("-o", "--out", required=True, metavar="CKPT_DIR", help="Checkpoint root to write (iter_0000000/, latest).")
@_user_errors
def hf_to_mcore_cmd(hf_dir: str, overrides: tuple[str, ...], recipe: str | None, files: tuple[str, ...], out: str) -> None:
    """HF_DIR (config.json + safetensors) -> a dist checkpoint for checkpoint.pretrained/load.

    One process writes it at TP=PP=1; under torchrun it uses the recipe's layout (for models
    that do not fit one process). Loadable at any TP/PP whose padded vocabulary is the same."""
    from .convert import hf_to_mcore, require_hf_dir

    hf = require_hf_dir(hf_dir)  # a wrong path says so before the recipe compiles
    path = hf_to_mcore(hf, out, config=_compiler()(recipe, overrides, files, hf))
    click.echo(f"wrote {path}")


@convert.command("mcore-to-hf")
@click.argument("ckpt_dir")
@_overrides
@click.option("--recipe", required=True, metavar="R.toml|NAME", help="Recipe the checkpoint was trained with.")
@_files
@click.option("-o", "--out", required=True, metavar="HF_OUT", help="Directory for safetensors + config.json.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file (e.g. 500MB).")
@click.option("--merge-lora", is_flag=True, help="A LoRA/DoRA checkpoint: merge its adapters into the weights.")
@click.option("--adapter-only", is_flag=True,
              help="A LoRA/DoRA checkpoint: write only its adapters, in PEFT's format (PeftModel.from_pretrained).")
@_user_errors
def mcore_to_hf_cmd(ckpt_dir: str, overrides: tuple[str, ...], recipe: str, files: tuple[str, ...], out: str,
                    max_shard_size: str, merge_lora: bool, adapter_only: bool) -> None:
    """CKPT_DIR (a checkpoint root or one iter_* directory) -> an HF directory transformers loads."""
    from .convert import mcore_to_hf, resolve_checkpoint
    from .lora_export import export_adapter

    if merge_lora and adapter_only:
        raise RecipeError("--merge-lora and --adapter-only exclude each other (a merged model, or only the adapters)")
    shard_size = _size(max_shard_size)
    resolve_checkpoint(ckpt_dir)  # a wrong path says so before the recipe compiles
    config = _compiler()(recipe, overrides, files, None)
    if adapter_only:
        path = export_adapter(ckpt_dir, out, config=config)
    else:
        path = mcore_to_hf(ckpt_dir, out, config=config, max_shard_size=shard_size, merge_lora=merge_lora)
    click.echo(f"wrote {path}")


def _compiler() -> Compiler:
    """What compiles this command's recipe: the one main() was handed (the CLI's, compiler/cli.py:
    compiler.api.compile_for_hf with its warnings printed), else convert.compile_recipe (the same
    compiler function, for this group invoked directly)."""
    from .convert import compile_recipe

    return click.get_current_context().find_root().obj or compile_recipe


def _add_verify() -> None:
    """`convert verify`: runtime/hf/verify.py's click command, in this group."""
    from .verify import verify_cmd

    convert.add_command(verify_cmd, "verify")


_add_verify()


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise RecipeError(f"--max-shard-size {text!r}: use a size such as 500MB or 5GB")


def main(args: list[str], prog_name: str = "recipec convert", compiler: Compiler | None = None) -> int:
    """The command table's entry (compiler/cli.py RUNTIME_COMMANDS): `compiler` compiles each
    command's recipe on the compiler side; the conversions receive the frozen config."""
    from recipec.runtime.logs import console
    from recipec.runtime.safe_load import install

    console()  # progress lines on stderr and the same library-noise filters as a training rank
    install()  # weights-only torch.load and data-only DCP metadata, before any checkpoint is read
    try:
        convert.main(args=args, prog_name=prog_name, standalone_mode=True, obj=compiler)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
