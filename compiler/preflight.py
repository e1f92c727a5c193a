"""Refuse, before any rank starts, a local run that this machine cannot run.

A recipe can be valid and still impossible *here*: a GPU recipe on a machine without a GPU
(it would start 8 CPU ranks of an 8B model and be OOM-killed a minute later), more
processes per node than the machine has GPUs, sequence parallelism on Megatron-Core's local
modules (torch's LayerNorm asserts against it, a 189-line traceback per rank), context
parallelism on them (their SDPA attention cannot split a sequence: a traceback per rank), no torch,
or, on node 0 of a multi-node run, a rendezvous port some other program holds. Each of these
is a `Problem` here, all of them are raised together as one LaunchError (exit 2, the fix in
the hint), within a second, and nothing is written or started.

These checks are for `recipec launch` running torchrun on *this* machine (the local
executor, with one node or a --node-rank). They are not for --dry-run, which runs nothing,
and not for submitting to SLURM: the login node that submits is not the compute node that
runs, and usually has no GPU at all. The port check on node 0 is repeated by the supervisor
at run time, so launch.sh and job.sbatch get it too (see rendezvous.py).

Fast and torch-free: GPUs are counted from the device files the NVIDIA driver creates
(/dev/nvidia0, /dev/nvidia1, ...), else /proc/driver/nvidia/gpus, else `nvidia-smi -L`, and
narrowed by CUDA_VISIBLE_DEVICES as CUDA does; Transformer Engine and Apex are looked up
with importlib.util.find_spec, never imported (a TE that is installed but cannot load is
reported by the runtime, which imports it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from .errors import Problem
from .executors.base import Built, LaunchError
from .rendezvous import head_port_problem, of_argv
from .sources import Source

SourceOf = Callable[[tuple[str, ...]], Source | None]
_DEVICE = re.compile(r"nvidia(\d+)")
_UUID = ("GPU-", "MIG-")


@attrs.frozen
class Gpus:
    """The GPUs a process started here would see, and how that was found (for messages)."""

    count: int
    evidence: str


def _physical(dev: Path, proc: Path, smi: str | None) -> Gpus:
    try:
        devices = sorted(p.name for p in dev.iterdir() if _DEVICE.fullmatch(p.name))
    except OSError:
        devices = []
    if devices:
        return Gpus(len(devices), f"{len(devices)} in {dev}/nvidia[0-9]*")
    try:
        boards = [p for p in proc.iterdir() if p.is_dir()]
    except OSError:
        boards = []
    if boards:
        return Gpus(len(boards), f"{len(boards)} in {proc}")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        listed = [line for line in out.splitlines() if line.startswith("GPU ")]
        return Gpus(len(listed), f"{len(listed)} listed by `nvidia-smi -L`")
    return Gpus(0, f"no {dev}/nvidia[0-9]*, no {proc}, no nvidia-smi on PATH")


def _visible(value: str, physical: int) -> int:
    """How many GPUs CUDA_VISIBLE_DEVICES=value leaves: CUDA reads the list up to its first entry
    that names no device (an index out of range, "-1", garbage) and ignores the rest."""
    count = 0
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit() and int(entry) < physical or entry.startswith(_UUID):
            count += 1
        else:
            break
    return min(count, physical)


def gpus(
    env: Mapping[str, str] | None = None,
    dev: Path = Path("/dev"),
    proc: Path = Path("/proc/driver/nvidia/gpus"),
    smi: str | None = "",
) -> Gpus:
    """The NVIDIA GPUs a process started here can use, without importing torch (see the module doc).
    `smi=""` looks nvidia-smi up on PATH; the parameters exist for tests."""
    env = os.environ if env is None else env
    physical = _physical(dev, proc, shutil.which("nvidia-smi") if smi == "" else smi)
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None or physical.count == 0:
        return physical
    return Gpus(_visible(mask, physical.count), f"CUDA_VISIBLE_DEVICES={mask!r} of {physical.evidence}")


def installed(module: str) -> bool:
    """Whether `module` is installed for this interpreter (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def local_modules_reason(transformer_impl: str, torch_compile: bool, have_te: bool) -> str | None:
    """Why the runtime will build Megatron-Core's local modules rather than Transformer Engine's,
    or None when it will use TE (mirrors runtime/layer_spec.uses_transformer_engine)."""
    if transformer_impl == "local":
        return 'model.transformer_impl is "local"'
    if transformer_impl == "auto" and torch_compile:
        return 'model.transformer_impl is "auto" and train.torch_compile takes the local modules'
    if transformer_impl == "auto" and not have_te:
        return f'model.transformer_impl is "auto" and transformer_engine is not installed for {sys.executable}'
    return None


def machine_problems(built: Built, source: SourceOf, have: Callable[[str], bool],
                     gpus_here: Callable[[], Gpus]) -> list[Problem]:
    """What this machine cannot run of the recipe (torch, GPUs, sequence parallel on local modules),
    given what is installed (`have`) and the GPUs found (`gpus_here`, asked only for a GPU recipe)."""
    c = built.config
    launch, problems = c.launch, []

    def problem(path: tuple[str, ...], message: str, hint: str) -> None:
        problems.append(Problem(LaunchError, message, key=".".join(path), source=source(path), hint=hint))

    if not have("torch"):
        problems.append(Problem(LaunchError, f"torch is not installed for {sys.executable}, so nothing can run here",
                                hint="install the runtime first: pip install -e '.[runtime]'"))
    if launch.accelerator != "cpu":
        found = gpus_here()
        procs = launch.gpus_per_node
        if found.count == 0:
            problem(("launch", "accelerator"),
                    f'"{launch.accelerator}" means {procs} GPU process(es) per node, but this machine has no NVIDIA '
                    f"GPU ({found.evidence})",
                    "run it on a GPU machine (or submit it: --executor slurm), or train on this machine's CPU with "
                    'launch.accelerator="cpu" and a model that fits in its memory, e.g. recipec launch llama3_tiny')
        elif procs > found.count:
            problem(("launch", "gpus_per_node"),
                    f"{procs} processes per node, one per GPU, but only {found.count} GPU(s) can be used here "
                    f"({found.evidence})",
                    f"set launch.gpus_per_node={found.count} (or --gpus-per-node {found.count}; the parallel layout "
                    "must still divide the world size), or spread the job over more nodes with --nodes")
    p = c.parallel
    if p.sequence_parallel:
        why = local_modules_reason(c.model.transformer_impl, c.train.torch_compile, have("transformer_engine"))
        if why is not None and not have("apex"):
            problem(("parallel", "sequence_parallel"),
                    "sequence parallelism needs Transformer Engine's (or Apex's) layer norms, but this run builds "
                    f"Megatron-Core's local modules, whose torch LayerNorm refuses it ({why})",
                    "set parallel.sequence_parallel=false (tensor parallelism works without it), or install "
                    "Transformer Engine on a GPU machine: pip install -e '.[te]'")
    if p.context_parallel_size > 1:
        why = local_modules_reason(c.model.transformer_impl, c.train.torch_compile, have("transformer_engine"))
        if why is not None:  # the local spec's attention (torch SDPA) cannot split a sequence over ranks
            problem(("parallel", "context_parallel_size"),
                    "context parallelism needs Transformer Engine's attention, but this run builds "
                    f"Megatron-Core's local modules, whose attention does not split sequences ({why})",
                    "set parallel.context_parallel_size=1, or run with Transformer Engine on a GPU machine: "
                    "pip install -e '.[te]'")
    return problems


def port_problems(argv: Sequence[str], source: SourceOf) -> list[Problem]:
    """On node 0 of a multi-node run: the rendezvous port must be free here (see rendezvous.py)."""
    rdzv = of_argv(argv)
    taken = head_port_problem(rdzv) if rdzv else None
    if taken is None:
        return []
    message, fix = taken
    path = ("launch", "master_port")
    return [Problem(LaunchError, message, key=".".join(path), source=source(path), hint=fix)]


def check(built: Built, argv: Sequence[str]) -> None:
    """Raise one LaunchError listing every reason this machine cannot run `argv` (the node's torchrun)."""
    source: SourceOf = built.tree.source
    problems = machine_problems(built, source, installed, gpus) + port_problems(argv, source)
    if problems:
        raise LaunchError(problems)
