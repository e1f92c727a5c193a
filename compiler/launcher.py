"""`recipec launch`: run a compiled artifact with its executor (`launch.executor`).

The recipe is compiled by `build()` like everywhere else; the launcher's own flags
(`--nodes`, `--gpus-per-node`, `--executor`, `--master`) are turned into ordinary overrides
first, so a node count that does not fit the parallel layout is refused by the validator
before anything starts or is submitted. What happens next belongs to the executor plug-in
(compiler/executors/): local checks that this machine can run the recipe (preflight.py: GPUs,
torch, sequence parallel on local modules, the rendezvous port on node 0), then runs the
supervised torchrun here; slurm submits job.sbatch (the login node is not checked: it is not
the machine that runs).

`--verbose` travels as the environment variable RECIPEC_VERBOSE=1 (supervisor.VERBOSE_ENV),
which the supervisor and every rank read: an environment variable reaches the ranks however
they are started (torchrun here, srun on a SLURM node, launch.sh by hand) without changing the
compiled artifact, so a verbose run and a quiet one share one fingerprint.

Nothing here imports torch; torchrun and sbatch are subprocesses.
"""

from __future__ import annotations

import click

from .api import Compiled
from .executors import executor_for
from .executors.base import Echo, LaunchError
from .supervisor import run_torchrun

__all__ = ["LaunchError", "flag_overrides", "launch", "run_torchrun"]


def flag_overrides(
    nodes: str | None = None,
    gpus_per_node: str | None = None,
    executor: str | None = None,
    master: str | None = None,
) -> list[str]:
    """The launcher's flags as dotted overrides, applied after the user's (so the flags win)."""
    out = []
    if nodes is not None:
        out.append(f"launch.nodes={nodes}")
    if gpus_per_node is not None:
        out.append(f"launch.gpus_per_node={gpus_per_node}")
    if executor is not None:
        out.append(f"launch.executor={executor}")
    if master is not None:
        host, sep, port = master.rpartition(":") if master.count(":") == 1 else ("", "", "")
        if not sep:
            host = master
        if not host:
            raise LaunchError(f"--master {master!r}: expected ADDR or ADDR:PORT (the rendezvous host, node 0)")
        out.append(f"launch.master_addr={_toml_string(host)}")
        if port:
            out.append(f"launch.master_port={port}")
    return out


def _toml_string(text: str) -> str:
    """A TOML basic string (the override's value is parsed as TOML, so `"` and `\\` must be escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _node_rank(compiled: Compiled, node_rank: str | None) -> int | None:
    if node_rank is None:
        return None
    nodes = compiled.config.launch.nodes
    try:
        rank = int(node_rank)
    except ValueError:
        rank = -1
    if not 0 <= rank < nodes:
        raise LaunchError(f"--node-rank {node_rank!r} is not a node index of this job (0..{nodes - 1}, "
                          f"launch.nodes = {nodes})")
    return rank


def launch(
    compiled: Compiled,
    *,
    out: str | None = None,
    dry_run: bool = False,
    node_rank: str | None = None,
    verbose: bool = False,
    echo: Echo = click.echo,
) -> int:
    """Check, write the build directory, then run or submit it. Returns the process exit code.
    `verbose`: the ranks and the supervisor show every line (library warnings, torchrun's banners)."""
    rank = _node_rank(compiled, node_rank)
    executor = executor_for(compiled.config.launch.executor)
    return executor.launch(compiled, out=out, dry_run=dry_run, node_rank=rank, verbose=verbose, echo=echo)
