"""The local executor: torchrun on this machine (and, for nodes > 1, one command per node).

One supervised torchrun (`sys.executable -m torch.distributed.run`) for this node, c10d
rendezvous. Ranks' output is streamed with a rank prefix. SIGINT/SIGTERM/SIGHUP/SIGUSR1 go
to the rank processes, which save a checkpoint and exit 0, and so does the launcher (see
supervisor.py). With nodes > 1 and no --node-rank it prints every node's command.
Writes launch.sh into the build directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..shell import Script, join, literal
from ..supervisor import run_torchrun
from .base import Built, Echo, Finding, LaunchError, ScriptFile
from .node import environment, launch_sh, node_argv, run_dir, supervised

if TYPE_CHECKING:
    from ..schema import RecipeConfig


class LocalExecutor:
    name = "local"
    script_names = ("launch.sh",)

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        return iter(())

    def scripts(self, built: Built, python: str | None = None) -> list[ScriptFile]:
        return [ScriptFile("launch.sh", launch_sh(built, python))]

    def launch(self, built: Built, *, out: str | None, dry_run: bool, node_rank: int | None, echo: Echo) -> int:
        c, plan = built.config, built.plan
        nodes = c.launch.nodes
        runs_here = not dry_run and (nodes == 1 or node_rank is not None)
        if runs_here and importlib.util.find_spec("torch") is None:
            raise LaunchError(f"torch is not installed for {sys.executable}; install the runtime first: "
                              "pip install -e '.[runtime]'")
        python = sys.executable
        directory = built.write(out, python=python)
        if nodes > 1 and node_rank is None:
            shown = Script(shebang=None)
            shown.comment(f"{c.name}: {plan.world_size} processes on {nodes} nodes; no scheduler, so start one "
                          f"command per node (node 0 at {c.launch.master_addr}:{c.launch.master_port} hosts the "
                          "rendezvous),")
            shown.comment("or on each node: recipec launch ... --node-rank K --master ADDR_OF_NODE_0")
            shown.exports(environment(built))
            for k in range(nodes):
                shown.comment(f"node {k}")
                shown.command(supervised(node_argv(built, k, python=python), python))
            echo(shown.text(), nl=False)
            return 0
        argv = literal(node_argv(built, node_rank or 0, python=python))
        if dry_run:
            echo(Script(shebang=None).exports(environment(built)).command(supervised(argv, python)).text(), nl=False)
            echo(f"recipec: dry run: wrote {directory}; nothing started", err=True)
            return 0
        Path(run_dir(built), "logs").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **environment(built)}
        echo(f"recipec: {c.name}: node {node_rank or 0} of {nodes}, {c.launch.gpus_per_node} process(es): "
             f"{join(argv)}", err=True)
        return run_torchrun(argv, env, echo)


EXECUTOR = LocalExecutor()
