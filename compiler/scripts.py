"""Launch scripts written next to the artifact: launch.sh (torchrun) or job.sbatch (SLURM).

Both are generated from the plan alone; what they run is exactly the plan's
per-node command with the plan's environment.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Compiled


def _exports(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def launch_script(compiled: Compiled) -> str:
    """A bash script that runs this node's share of the job with torchrun."""
    c, plan = compiled.config, compiled.plan
    lines = [
        "#!/usr/bin/env bash",
        f"# recipec {c.name}: {plan.world_size} processes on {c.launch.nodes} node(s)",
        f"# fingerprint {compiled.fingerprint}",
        "set -euo pipefail",
        *_exports(plan.env),
    ]
    if c.launch.nodes > 1:
        lines.append('NODE_RANK="${NODE_RANK:?set NODE_RANK to this node\'s index (0..%d)}"' % (c.launch.nodes - 1))
        command = list(plan.node_commands[-1] if c.launch.nodes > 2 else plan.node_commands[0])
        command = [("--node-rank=$NODE_RANK" if a.startswith("--node-rank=") else a) for a in command]
        lines.append(" ".join(a if "$" in a else shlex.quote(a) for a in command) + ' "$@"')
    else:
        lines.append("exec " + plan.command_line(0) + ' "$@"')
    return "\n".join(lines) + "\n"


def sbatch_script(compiled: Compiled, log_dir: str) -> str:
    """An sbatch job: one task per node, torchrun inside, preemption signal for checkpointing."""
    c, plan = compiled.config, compiled.plan
    launch = c.launch
    directives = [
        f"--job-name={c.name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",
        f"--time={launch.slurm_time}",
        f"--output={log_dir}/%x-%j.out",
        f"--signal=B:USR1@{launch.preempt_grace_s}",
    ]
    if launch.accelerator != "cpu":
        directives.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.slurm_account:
        directives.append(f"--account={launch.slurm_account}")
    if launch.slurm_partition:
        directives.append(f"--partition={launch.slurm_partition}")
    if launch.slurm_exclusive:
        directives.append("--exclusive")
    if launch.slurm_requeue:
        directives.append("--requeue")
    torchrun = list(plan.node_commands[0])
    torchrun = [
        "--node-rank=$SLURM_NODEID" if a.startswith("--node-rank=")
        else "--rdzv-endpoint=$HEAD_NODE:%d" % launch.master_port if a.startswith("--rdzv-endpoint=")
        else "--rdzv-id=$SLURM_JOB_ID" if a.startswith("--rdzv-id=")
        else "--nnodes=$SLURM_NNODES" if a.startswith("--nnodes=")
        else a
        for a in torchrun
    ]
    srun = ["srun", "--kill-on-bad-exit=1"]
    if launch.container_image:
        srun.append(f"--container-image={launch.container_image}")
        if launch.container_mounts:
            srun.append(f"--container-mounts={','.join(launch.container_mounts)}")
    inner = " ".join(a if "$" in a else shlex.quote(a) for a in torchrun)
    lines = ["#!/usr/bin/env bash", *[f"#SBATCH {d}" for d in directives],
             f"# recipec {c.name}, fingerprint {compiled.fingerprint}",
             "set -euo pipefail",
             *_exports(plan.env),
             'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             "export HEAD_NODE",
             # The batch shell gets USR1 before the time limit; pass it to every rank so they save.
             "trap 'echo recipec: preemption signal, forwarding to ranks; kill -USR1 $SRUN_PID; wait $SRUN_PID' USR1",
             " ".join(shlex.quote(a) for a in srun) + f" bash -c {shlex.quote(inner)} &",
             "SRUN_PID=$!",
             "wait $SRUN_PID",
             ]
    return "\n".join(lines) + "\n"
