"""The local executor: torchrun on this machine (and, for nodes > 1, one command per node).

One supervised torchrun (`sys.executable -m torch.distributed.run`) for this node. A one-node
job uses torchrun's standalone rendezvous on a port the kernel picks, so a busy 29500 does
not matter; a multi-node job meets at launch.master_addr:launch.master_port (see node.py and
rendezvous.py). Before a rank starts, preflight.py refuses what this machine cannot run
(no GPU for a GPU recipe, more processes than GPUs, sequence parallel on local modules, a
taken rendezvous port on node 0) with exit 2 and the fix. Ranks' output is streamed with a
rank prefix. SIGINT/SIGTERM/SIGHUP/SIGUSR1 go to the rank processes, which save a checkpoint
and exit 0, and so does the launcher (see supervisor.py). With nodes > 1 and no --node-rank
it prints every node's command; where launch.master_addr is a loopback address those read
the head node's address from $HEAD_NODE, and a warning says what to set.
Writes launch.sh into the build directory.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import preflight
from ..rendezvous import hosted_here, is_loopback
from ..shell import Script, join, literal
from ..supervisor import VERBOSE_ENV, run_torchrun
from .base import Built, Echo, Finding, ScriptFile
from .node import (
    NEED_HEAD_NODE,
    environment,
    head_endpoint,
    launch_sh,
    node_argv,
    run_dir,
    supervised,
)

if TYPE_CHECKING:
    from ..schema import RecipeConfig


class LocalExecutor:
    name = "local"
    script_names = ("launch.sh",)

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        return iter(())

    def scripts(self, built: Built, python: str | None = None) -> list[ScriptFile]:
        return [ScriptFile("launch.sh", launch_sh(built, python))]

    def launch(self, built: Built, *, out: str | None, dry_run: bool, node_rank: int | None, echo: Echo,
               verbose: bool = False) -> int:
        nodes = built.config.launch.nodes
        python = sys.executable
        shown_env = {**environment(built), **({VERBOSE_ENV: "1"} if verbose else {})}
        if nodes > 1 and node_rank is None:
            built.write(out, python=python)
            return _print_node_commands(built, python, echo, shown_env)
        argv = literal(node_argv(built, node_rank or 0, python=python))
        if dry_run:
            directory = built.write(out, python=python)
            echo(Script(shebang=None).exports(shown_env).command(supervised(argv, python)).text(), nl=False)
            echo(f"recipec: dry run: wrote {directory}; nothing started", err=True)
            return 0
        preflight.check(built, argv)  # before anything is written or started
        built.write(out, python=python)
        if nodes > 1:
            _warn_rendezvous(built, node_rank or 0, echo)
        Path(run_dir(built), "logs").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **shown_env}
        env.setdefault("RECIPEC_LAUNCH_TIME", repr(time.time()))  # ranks report launch -> first step (runtime/metrics.py)
        echo(f"recipec: {built.name}: node {node_rank or 0} of {nodes}, {built.config.launch.gpus_per_node} "
             f"process(es): {join(argv)}", err=True)
        return run_torchrun(argv, env, echo)


def _print_node_commands(built: Built, python: str, echo: Echo, env: dict[str, str]) -> int:
    """Every node's command, for a multi-node job without a scheduler (nothing runs)."""
    c, plan = built.config, built.plan
    endpoint = head_endpoint(built)
    head = "$HEAD_NODE" if endpoint is not None else c.launch.master_addr
    shown = Script(shebang=None)
    shown.comment(f"{c.name}: {plan.world_size} processes on {c.launch.nodes} nodes; no scheduler, so start one "
                  f"command per node (node 0 at {head}:{c.launch.master_port} hosts the rendezvous),")
    shown.comment("or on each node: recipec launch ... --node-rank K --master ADDR_OF_NODE_0")
    if endpoint is not None:
        shown.code(NEED_HEAD_NODE)
    shown.exports(env)
    for k in range(c.launch.nodes):
        shown.comment(f"node {k}")
        shown.command(supervised(node_argv(built, k, python=python, rdzv_endpoint=endpoint), python))
    echo(shown.text(), nl=False)
    _warn_loopback(built, echo, "the commands above read node 0's address from $HEAD_NODE instead")
    return 0


def _warn_loopback(built: Built, echo: Echo, consequence: str) -> None:
    launch = built.config.launch
    if is_loopback(launch.master_addr):
        echo(f"recipec: warning: launch.master_addr is {launch.master_addr}, a loopback address the other nodes "
             f"cannot reach; {consequence}. Set it to node 0's address: --master ADDR_OF_NODE_0[:PORT] "
             f"(or launch.master_addr=ADDR)", err=True)


def _warn_rendezvous(built: Built, node_rank: int, echo: Echo) -> None:
    """Warnings, not errors, for one node of a multi-node job: names and addresses can be right in
    ways this machine cannot see (all nodes on one machine for a test, DNS aliases)."""
    launch = built.config.launch
    _warn_loopback(built, echo, "this node and node 0 must then be the same machine")
    if node_rank == 0 and not hosted_here(launch.master_addr):
        echo(f"recipec: warning: node 0 hosts the rendezvous, but launch.master_addr {launch.master_addr} is not "
             "an address of this machine, so no node may host it and the rendezvous will time out; run node 0 on "
             f"{launch.master_addr}, or pass this machine's address with --master", err=True)


EXECUTOR = LocalExecutor()
