"""The `recipec` command line. Every user mistake: a message and exit code 2, no traceback."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .api import Compiled, build, compile_for_hf
from .cli_base import USER_ERROR, fail, user_errors
from .cli_base import files as _files
from .cli_base import overrides as _overrides
from .errors import Problem, RecipeError
from .executors import executor_for
from .schema import RecipeConfig
from .text import shown

# The shared conventions (also used by the runtime's commands, which must not import this module).
_user_errors, _fail = user_errors, fail


def _check_out(out: str | None) -> None:
    """`-o DIR` names a directory (made when missing); refuse a file there before compiling."""
    if out is not None and os.path.lexists(out) and not os.path.isdir(out):
        raise RecipeError([Problem(RecipeError, f"-o {shown(out)} is a file, not a directory",
                                   hint="name a build directory (it is created when missing), or remove the file")])


def _compile(recipe: str, overrides: tuple[str, ...], files: tuple[str, ...], out: str | None = None) -> Compiled:
    _check_out(out)
    compiled = build(recipe, overrides, overlays=files, artifact_dir=out)
    for warning in compiled.warnings:
        click.echo(f"recipec: warning: {warning}", err=True)
    return compiled


def _summary(compiled: Compiled) -> str:
    c, p = compiled.config, compiled.plan
    par = c.parallel
    mem = p.memory_gib
    return "\n".join([
        (f"{c.name}: {p.params_total / 1e9:.3g}B params ({p.params_active / 1e9:.3g}B active), "
         f"seq {c.model.seq_length}, {c.launch.nodes} node(s) x {c.launch.gpus_per_node} = {p.world_size} ranks"),
        f"  layout   TP {par.tensor_model_parallel_size} x PP {par.pipeline_model_parallel_size} x "
        f"CP {par.context_parallel_size} x DP {p.data_parallel_size}"
        + (f", EP {par.expert_model_parallel_size}" if c.model.is_moe else ""),
        (f"  batch    global {c.train.global_batch_size} = micro {c.train.micro_batch_size} x "
         f"{p.microbatches_per_step} microbatches x DP {p.data_parallel_size}; {p.tokens_per_step:,} tokens/step"),
        f"  compute  {p.flops_per_step / 1e15:.4g} PFLOP/step (Megatron formula)",
        f"  memory   ~{mem['total']} GiB/GPU (weights {mem['weights']}, grads {mem['gradients']}, "
        f"optimizer {mem['optimizer']}, activations {mem['activations']}"
        + (f", fp8 copies {mem['fp8']}" if mem.get("fp8") else "") + f") on {p.accelerator}",
        f"  run      {p.command_line(0)}",
        f"  fingerprint {compiled.fingerprint}",
    ])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipec")
def main() -> None:
    """Compile TOML training recipes for Megatron-Core and launch them."""




@main.command("build")
@click.argument("recipe")
@_overrides
@_files
@click.option("-o", "--out", metavar="DIR", help="Build directory (default build/<name>).")
@click.option("--format", "fmt", type=click.Choice(["summary", "toml", "json"]), default="summary",
              help="What to print: a summary, the resolved TOML, or plan.json.")
@_user_errors
def build_cmd(recipe: str, overrides: tuple[str, ...], files: tuple[str, ...], out: str | None, fmt: str) -> None:
    """Compile RECIPE with OVERRIDES (key=value, +key=value, ~key); write resolved.toml, plan.json, launch.sh."""
    compiled = _compile(recipe, overrides, files, out)
    directory = compiled.write(out)
    if fmt == "toml":
        click.echo(compiled.to_toml(), nl=False)
    elif fmt == "json":
        click.echo(compiled.to_json(), nl=False)
    else:
        click.echo(_summary(compiled))
        names = ("resolved.toml", "plan.json", *executor_for(compiled.config.launch.executor).script_names)
        written = ", ".join(n for n in names if (directory / n).is_file())
        click.echo(f"  wrote    {directory}/{written}")


@main.command()
@click.argument("recipe")
@click.argument("key")
@_overrides
@_files
@_user_errors
def explain(recipe: str, key: str, overrides: tuple[str, ...], files: tuple[str, ...]) -> None:
    """Show KEY of RECIPE: value, where it was set, default and help."""
    click.echo(_compile(recipe, overrides, files).explain(key))


@main.command()
@click.argument("recipe_a")
@click.argument("recipe_b")
@_user_errors
def diff(recipe_a: str, recipe_b: str) -> None:
    """Keys whose resolved values differ between two recipes."""
    from .render import config_to_dict, toml_value
    from .tree import leaves

    def values(recipe: str) -> dict[tuple[str, ...], Any]:  # an empty table ({}) is no value of its own
        return {k: v for k, v in leaves(config_to_dict(build(recipe).config)) if v != {}}

    def shown_value(value: Any) -> str:
        return "(unset)" if value is None else toml_value(value)

    a, b = values(recipe_a), values(recipe_b)
    rows = [(".".join(k), a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != ("name",)]
    if not rows:
        click.echo("no differences")
    width = max((len(r[0]) for r in rows), default=0)
    for key, left, right in rows:
        click.echo(f"{key:<{width}}  {shown_value(left)}  ->  {shown_value(right)}")


@main.command("list")
@_user_errors
def list_cmd() -> None:
    """The bundled recipes, grouped by family."""
    from .library import library_table

    click.echo(library_table())


@main.command("launch")
@click.argument("recipe")
@_overrides
@_files
@click.option("--nodes", metavar="N", help="Machines (same as launch.nodes=N).")
@click.option("--gpus-per-node", metavar="G", help="Processes per machine (same as launch.gpus_per_node=G).")
@click.option("--executor", metavar="local|slurm", help="torchrun here, or an sbatch job (same as launch.executor=...).")
@click.option("--dry-run", is_flag=True, help="Write the build directory and print what would run; start nothing.")
@click.option("-o", "--out", metavar="DIR", help="Build directory (default build/<name>).")
@click.option("--node-rank", metavar="K", help="local executor, nodes > 1: run node K's share.")
@click.option("--master", metavar="ADDR[:PORT]", help="Rendezvous host (node 0) for --node-rank; sets launch.master_addr.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show every line: library warnings from every rank, torchrun's banners (RECIPEC_VERBOSE=1).")
@_user_errors
def launch_cmd(recipe: str, overrides: tuple[str, ...], files: tuple[str, ...], nodes: str | None,
               gpus_per_node: str | None, executor: str | None, dry_run: bool, out: str | None,
               node_rank: str | None, master: str | None, verbose: bool) -> None:
    """Compile RECIPE with OVERRIDES, write the build directory, then run it (torchrun) or submit it (sbatch)."""
    from .launcher import flag_overrides, launch

    extra = flag_overrides(nodes=nodes, gpus_per_node=gpus_per_node, executor=executor, master=master)
    compiled = _compile(recipe, (*overrides, *extra), files, out)
    sys.exit(launch(compiled, out=out, dry_run=dry_run, node_rank=node_rank, verbose=verbose, echo=click.echo))


@main.command("import-hf")
@click.argument("path")
@click.option("-o", "--out", metavar="FILE", help="Write the recipe here (default: print it).")
@click.option("--base", type=click.Choice(["pretrain", "finetune"]), default="pretrain", show_default=True,
              help="Bundled base to extend; finetune also sets checkpoint.pretrained to PATH.")
@_user_errors
def import_hf_cmd(path: str, out: str | None, base: str) -> None:
    """A TOML recipe from a local Hugging Face model directory's config.json (offline)."""
    from pathlib import Path

    from .hf_import import recipe_from_hf

    if out is not None and (not out.endswith(".toml") or os.path.isdir(out)):
        raise RecipeError([Problem(RecipeError, f"-o {shown(out)} must name a .toml file",
                                   hint="e.g. -o my_model.toml (recipes are .toml files; its name becomes the recipe's)")])
    name = Path(out).stem if out else None
    text = recipe_from_hf(path, base=base, name=name)
    if out:
        Path(out).write_text(text, encoding="utf-8")
        click.echo(f"wrote {shown(out)}")
    else:
        click.echo(text, nl=False)


# Commands that need torch (the runtime extra), declared here by "module:function" and imported only
# when one runs, so that the compiler imports nothing from runtime/ and `recipec build` never loads
# torch. Each function takes the command's arguments (a list of strings) and `compiler`, the CLI's
# recipe compiler (_compile_for_runtime), and returns the exit status: the CLI compiles, the runtime
# receives the frozen config (it never calls `build` itself).
RUNTIME_COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("recipec.runtime.hf.cli:main",
                ("Weights: `convert hf-to-mcore HF_DIR -o CKPT` | `convert mcore-to-hf CKPT --recipe R -o HF_OUT` | "
                 "`convert verify CKPT HF_DIR --recipe R` (needs torch).")),
}


def _compile_for_runtime(recipe: str | None, overrides: Sequence[str], files: Sequence[str],
                         hf_dir: str | os.PathLike[str] | None) -> RecipeConfig:
    """What a runtime command is handed to compile its recipe: compile_for_hf (a recipe, or without
    one the import-hf recipe of hf_dir), its warnings printed like every command's."""
    compiled = compile_for_hf(recipe, tuple(overrides), overlays=tuple(files), hf_dir=hf_dir)
    for warning in compiled.warnings:
        click.echo(f"recipec: warning: {warning}", err=True)
    return compiled.config


def _runtime_command(name: str, target: str, summary: str) -> click.Command:
    """A command that hands its arguments to `target` ("module:function"), imported when it runs."""

    def run(args: tuple[str, ...]) -> None:
        module_name, function = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            click.echo(f"recipec: error: `recipec {name}` needs the runtime (torch, megatron-core, safetensors): "
                       f"{exc}\n   hint: pip install 'recipec[runtime]'", err=True)
            sys.exit(USER_ERROR)
        sys.exit(getattr(module, function)(list(args), compiler=_compile_for_runtime))

    run.__doc__ = summary
    command = click.command(name, add_help_option=False, help=summary,
                            context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    return command(click.argument("args", nargs=-1, type=click.UNPROCESSED)(run))


for _name, (_target, _summary_text) in RUNTIME_COMMANDS.items():
    main.add_command(_runtime_command(_name, _target, _summary_text))


@main.command()
def schema() -> None:
    """JSON Schema of the recipe format (for editor completion and checking)."""
    from .jsonschema import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
