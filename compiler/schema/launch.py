"""[launch] and [peft]: where the job runs, and the adapter finetuning option.

`launch_rules` is the check every executor shares: `[launch]` values end up in generated
shell scripts and in every rank's environment, so env names must be identifiers, a few
names that would make data run as code are refused, and no value may hold a line break
or NUL. An executor adds its own rules (executors/).
"""

import json
import typing
from collections.abc import Iterator

import attrs

from ..executors import EXECUTORS
from ..hardware import ACCELERATORS
from ..shell import is_identifier, script_text_problem
from ._fields import option
from .bounds import (
    MAX_ENV_STRING,
    MAX_FACTOR,
    MAX_GRACE_S,
    MAX_NODES,
    MAX_PROCS_PER_NODE,
    MAX_RESTARTS,
    MAX_WIDTH,
)

# Environment names a recipe may not set, and why: each would let data run code, load code
# no one asked for, unpickle a checkpoint, or take over a variable the scripts set themselves.
# Search paths (PATH, PYTHONPATH, LD_LIBRARY_PATH) stay allowed: they name code already on disk
# and clusters need them.
REFUSED_ENV: dict[str, str] = {
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "it switches torch.load's weights-only mode off, so loading a checkpoint "
                                        "could unpickle and run code",
    "LD_PRELOAD": "it makes every process load the named library before its own code",
    "LD_AUDIT": "it makes every process load the named auditing library before its own code",
    "BASH_ENV": "every non-interactive bash (the job's `bash -c` too) expands it, command substitution "
                "included, and runs the file it names",
    "ENV": "sh and bash in POSIX mode expand it, command substitution included, and run the file it names",
    "SHELLOPTS": "it switches on options (xtrace, ...) in every bash the scripts start",
    "BASHOPTS": "it switches on options in every bash the scripts start",
    "PS4": "bash expands it, command substitution included, before every traced line",
    "PROMPT_COMMAND": "bash runs its value as a command",
    "IFS": "it changes how the scripts' shells split words",
    "PYTHONSTARTUP": "python runs the file it names",
    "PYTHONINSPECT": "python stops at an interactive prompt after the rank's code, so the job hangs",
    "PYTHONBREAKPOINT": "python imports and calls the function it names at every breakpoint()",
    "PYTHONWARNINGS": "a warning filter names its category by module path, and python imports that module",
    "NODE_RANK": "launch.sh reads it per node (NODE_RANK=K bash launch.sh); it is not one value for all nodes",
    "HEAD_NODE": "job.sbatch sets it from the job's node list, and a multi-node launch.sh whose master_addr is a "
                 "loopback address reads it per node as node 0's address",
}


@attrs.frozen
class LaunchConfig:
    """Machines, processes and the scheduler that starts them."""

    nodes: int = option(1, "Machines.", min=1, max=MAX_NODES)
    gpus_per_node: int = option(8, "Processes per machine (GPUs; CPU processes without GPU).", min=1,
                                max=MAX_PROCS_PER_NODE)
    executor: str = option("local", "local: torchrun here; slurm: an sbatch job.", choices=tuple(EXECUTORS))
    master_addr: str = option(
        "127.0.0.1", "Node 0's address, where a multi-node run without a scheduler meets (--master); with a "
        "loopback address the scripts read it from $HEAD_NODE. Unused with one node and under SLURM.")
    master_port: int = option(
        29500, "Rendezvous port on node 0 of a multi-node run (checked free there before the ranks start); a "
        "one-node run lets the kernel pick a free port.", min=1, max=65535)
    accelerator: str = option(
        "H100-80GB", "What each process runs on; sets the memory budget and the MFU peak.",
        choices=tuple(ACCELERATORS),
    )
    max_restarts: int = option(0, "torchrun restarts after a failure (resume from checkpoint).", min=0,
                               max=MAX_RESTARTS)
    output_dir: str = option("runs/{name}", "Run directory; {name} is the recipe name.")
    slurm_account: str | None = option(None, "SLURM account (-A).")
    slurm_partition: str | None = option(None, "SLURM partition (-p).")
    slurm_time: str = option("04:00:00", "SLURM time limit.")
    slurm_exclusive: bool = option(True, "Ask SLURM for whole nodes.")
    slurm_requeue: bool = option(True, "Requeue after preemption; the run resumes from its checkpoint.")
    preempt_grace_s: int = option(120, "Seconds between the warning signal and the kill.", min=0, max=MAX_GRACE_S)
    container_image: str | None = option(None, "Container image for srun (pyxis).")
    container_mounts: tuple[str, ...] = option((), "src:dst mounts for the container.")
    env: dict[str, str] = option({}, "Extra environment variables for every rank.")


def env_key_display(name: str) -> str:
    """How an env entry's key reads in a message: launch.env.NCCL_DEBUG, or quoted when it is not a name."""
    return f"launch.env.{name}" if is_identifier(name) else f"launch.env.{json.dumps(name)}"


def env_string_bytes(name: str, value: str) -> int:
    """Bytes of `NAME=value` in a process's environment, the terminating NUL included."""
    return len(name.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass")) + 2


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def launch_rules(launch: LaunchConfig) -> Iterator[tuple[tuple[str, ...], str, str | None]]:
    """The checks every executor shares (see the module doc); paths are tuples, as the tree keys them."""
    for field in attrs.fields(LaunchConfig):
        if typing.get_origin(field.type) is dict:
            continue
        for text in _texts(getattr(launch, field.name)):
            problem = script_text_problem(text)
            if problem:
                yield (("launch", field.name), f"{text!r} {problem}", "write it on one line, without control characters")
                break
    for name, value in launch.env.items():
        path = ("launch", "env", name)
        if not is_identifier(name):
            message = (f"environment variable name {name!r} is not an identifier "
                       "(letters, digits and _, not starting with a digit), so no script may export it")
            yield (path, message, "rename it, e.g. NCCL_DEBUG = \"INFO\"")
        elif name in REFUSED_ENV:
            yield (path, f"launch.env may not set {name}: {REFUSED_ENV[name]}", f"remove {name} from [launch.env]")
        problem = script_text_problem(value)
        if problem:
            yield (path, f"the value {value!r} {problem}", "write it on one line, without control characters")
        size = env_string_bytes(name, value)
        if size > MAX_ENV_STRING:
            yield (path, (f"the entry is {size:,} bytes as an environment string (NAME=value, name "
                          f"{len(name):,} characters); Linux refuses one over {MAX_ENV_STRING:,} bytes (128 KiB), "
                          "so no rank could start"), "pass large data in a file, and the file's path in the variable")


@attrs.frozen
class PeftConfig:
    """Parameter-efficient finetuning; only the adapters train.

    `lora` adds (alpha / r) * B A to each target weight; `dora` (weight-decomposed LoRA, as PEFT's
    `use_dora`) also trains a magnitude per output row: W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||,
    the norm over each row's inputs, m starting at ||W||. Both export merged or as a PEFT adapter
    (`recipec convert mcore-to-hf --merge-lora | --adapter-only`)."""

    method: str | None = option(None, "Adapter kind (lora, or dora: LoRA plus a trained magnitude per output "
                                      "row); unset for full training.", choices=("lora", "dora"))
    lora_rank: int = option(16, "LoRA rank r.", min=1, max=MAX_WIDTH)
    lora_alpha: float = option(32.0, "LoRA scaling alpha (update scaled by alpha / r).", min=0.0, max=MAX_FACTOR)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input (dora: on the low-rank path only).",
                                 min=0.0, max=1.0)
    target_modules: tuple[str, ...] = option(
        ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
        "Megatron linear layers that get adapters.",
    )
