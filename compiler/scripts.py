"""What actually runs on a node: the torchrun command, launch.sh (torchrun) and job.sbatch (SLURM).

All three come from the plan alone, through `node_argv`: the plan's per-node
torchrun command with

- `torchrun` mapped to `PYTHON -m torch.distributed.run` when a Python is
  given (the venv that runs recipec, so its torch is the one used);
- per-node values filled in (node rank, rendezvous endpoint and id, and for
  SLURM the shell variables that hold them);
- `--tee=3 --log-dir=RUN_DIR/logs/torchrun`: every rank's stdout/stderr is
  streamed with a `[default<local rank>]:` prefix and kept per rank on disk;
- the nsys plugin (`profiling.use_nsys`): each rank runs under
  `nsys profile -c cudaProfilerApi --capture-range-end=stop`, and the runtime
  opens and closes the capture range at the configured steps.

The performance environment is the plan's `env`, exported as is. Nothing here
imports torch.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Compiled

TORCHRUN_MODULE = "torch.distributed.run"
# Launcher-side environment: unbuffered ranks so their lines stream as they happen.
STREAM_ENV = {"PYTHONUNBUFFERED": "1"}
# Per-task shell variables on a SLURM node; the values torchrun gets there.
SLURM_NODE_RANK = "$SLURM_NODEID"
SLURM_NNODES = "$SLURM_NNODES"
SLURM_RDZV_ID = "$SLURM_JOB_ID"
SLURM_HEAD = "$HEAD_NODE"


def run_dir(compiled: Compiled) -> str:
    """launch.output_dir with {name} filled in: logs, torchrun rank logs and nsys reports go here."""
    return compiled.config.launch.output_dir.replace("{name}", compiled.config.name)


def nsys_prefix(compiled: Compiled) -> list[str]:
    """The per-rank nsys wrapper; the capture range is opened and closed by the runtime (cudaProfilerApi)."""
    return [
        "nsys", "profile",
        "-c", "cudaProfilerApi",
        "--capture-range-end=stop",
        "--force-overwrite=true",
        "-o", f"{run_dir(compiled)}/nsys/{compiled.config.name}-rank%q{{RANK}}",
    ]


def node_argv(
    compiled: Compiled,
    node_rank: int | str = 0,
    *,
    python: str | None = None,
    nnodes: int | str | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """The command one node runs: the plan's torchrun command, made runnable (see the module doc)."""
    c = compiled.config
    base = list(compiled.plan.node_commands[0])
    if not base or base[0] != "torchrun" or "-m" not in base:
        raise ValueError(f"unexpected plan command {base!r}")
    split = base.index("-m")
    replace = {
        "--node-rank": str(node_rank),
        "--nnodes": None if nnodes is None else str(nnodes),
        "--rdzv-endpoint": rdzv_endpoint,
        "--rdzv-id": rdzv_id,
    }
    options = []
    for arg in base[1:split]:
        flag = arg.split("=", 1)[0]
        options.append(f"{flag}={replace[flag]}" if replace.get(flag) is not None else arg)
    options += [f"--log-dir={run_dir(compiled)}/logs/torchrun", "--tee=3"]
    rank_command = base[split:]  # -m recipec.runtime.train --artifact DIR
    if c.profiling.use_nsys:
        rank_command = ["--no-python", *nsys_prefix(compiled), python or "python", *rank_command]
    head = [python, "-m", TORCHRUN_MODULE] if python else ["torchrun"]
    return head + options + rank_command


_SAFE = re.compile(r"[\w@%+=:,./-]+")
_SAFE_WITH_VARS = re.compile(r"[\w@%+=:,./${}-]+")


def shell_join(argv: Sequence[str]) -> str:
    """Like shlex.join, but words holding `$VAR` stay unquoted so the shell expands them."""
    return " ".join(a if "$" in a and _SAFE_WITH_VARS.fullmatch(a) else shlex.quote(a) for a in argv)


def _double_quoted(argv: Sequence[str]) -> str:
    """Words for a command inside a single-quoted `bash -c '...'`: "double quotes" where needed, $VARs live."""
    out = []
    for a in argv:
        if _SAFE.fullmatch(a) or ("$" in a and _SAFE_WITH_VARS.fullmatch(a)):
            out.append(a)
        else:
            out.append('"' + re.sub(r'(["\\`])', r"\\\1", a) + '"')
    return " ".join(out)


def _exports(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def launch_script(compiled: Compiled, python: str | None = None) -> str:
    """launch.sh: this node's share of the job with torchrun (NODE_RANK picks the node when nodes > 1)."""
    c, plan = compiled.config, compiled.plan
    lines = [
        "#!/usr/bin/env bash",
        f"# recipec {c.name}: {plan.world_size} processes on {c.launch.nodes} node(s)",
        f"# fingerprint {compiled.fingerprint}",
        "set -euo pipefail",
        *_exports({**plan.env, **STREAM_ENV}),
    ]
    if c.launch.nodes > 1:
        lines.append('NODE_RANK="${NODE_RANK:?set NODE_RANK to this node\'s index (0..%d)}"' % (c.launch.nodes - 1))
        rank: int | str = "$NODE_RANK"
    else:
        rank = 0
    lines.append("exec " + shell_join(node_argv(compiled, rank, python=python)) + ' "$@"')
    return "\n".join(lines) + "\n"


def sbatch_log(compiled: Compiled) -> str:
    """The job's output file pattern (%x job name, %j job id); its directory must exist before sbatch."""
    return f"{run_dir(compiled)}/logs/%x-%j.out"


def sbatch_script(compiled: Compiled, python: str | None = None) -> str:
    """job.sbatch: one task per node runs torchrun; USR1 before the time limit → save → requeue → resume.

    `python` is the interpreter on the nodes that has torch and recipec (recipec launch passes
    its own, which suits a shared filesystem); with a container image it is the image's
    `torchrun` / `python`.
    """
    c, plan = compiled.config, compiled.plan
    launch = c.launch
    directives = [
        f"--job-name={c.name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",
    ]
    if launch.accelerator != "cpu":
        directives.append(f"--gpus-per-node={launch.gpus_per_node}")
    else:
        directives.append(f"--cpus-per-task={launch.gpus_per_node}")
    directives.append(f"--time={launch.slurm_time}")
    if launch.slurm_account:
        directives.append(f"--account={launch.slurm_account}")
    if launch.slurm_partition:
        directives.append(f"--partition={launch.slurm_partition}")
    if launch.slurm_exclusive:
        directives.append("--exclusive")
    directives += [
        f"--output={sbatch_log(compiled)}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=B:USR1@{launch.preempt_grace_s}",
    ]
    if launch.slurm_requeue:
        directives.append("--requeue")

    if launch.container_image:
        python = None  # the image's torchrun and python
    torchrun = node_argv(compiled, SLURM_NODE_RANK, python=python, nnodes=SLURM_NNODES,
                         rdzv_endpoint=f"{SLURM_HEAD}:{launch.master_port}", rdzv_id=SLURM_RDZV_ID)
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if launch.accelerator == "cpu":
        srun.append(f"--cpus-per-task={launch.gpus_per_node}")
    if launch.container_image:
        srun.append(f"--container-image={launch.container_image}")
        if launch.container_mounts:
            srun.append(f"--container-mounts={','.join(launch.container_mounts)}")
        srun.append('--container-workdir="$SLURM_SUBMIT_DIR"')
    # The torchrun agent ignores USR1 (inherited through exec); the ranks install their own handler.
    task = 'trap "" USR1; exec ' + _double_quoted(torchrun)
    srun_line = " ".join(a if a.startswith("--container-workdir=") else shlex.quote(a) for a in srun)
    requeue = "1" if launch.slurm_requeue else "0"
    lines = [
        "#!/usr/bin/env bash",
        *[f"#SBATCH {d}" for d in directives],
        f"# recipec {c.name}: {plan.world_size} processes on {launch.nodes} node(s); fingerprint {compiled.fingerprint}",
        "set -uo pipefail",
        *_exports({**plan.env, **STREAM_ENV}),
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        '[[ -n $HEAD_NODE ]] || { echo "recipec: no head node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1; }',
        "export HEAD_NODE",
        'echo "recipec: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), '
        'head $HEAD_NODE, $(date -u +%FT%TZ)"',
        "",
        f"# Preemption: SLURM sends USR1 here {launch.preempt_grace_s}s before the time limit (and TERM on",
        "# scancel/preemption). srun passes it to every rank, which saves a checkpoint and exits 0;",
        "# after USR1 the job requeues itself and the next start resumes from that checkpoint.",
        f"REQUEUE_ON_USR1={requeue}",
        "requeue=0",
        "caught=0",
        "forward() {",
        '    echo "recipec: SIG$1 received; asking the ranks to save a checkpoint and stop"',
        "    caught=1",
        '    if [[ $1 == USR1 && $REQUEUE_ON_USR1 == 1 ]]; then requeue=1; fi',
        '    kill -s "$1" "$SRUN_PID" 2>/dev/null || true',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        f"{srun_line} bash -c {shlex.quote(task)} &",
        "SRUN_PID=$!",
        "while :; do",
        "    caught=0",
        '    wait "$SRUN_PID"',
        "    status=$?",
        "    # a trapped signal interrupts wait (status > 128); wait again for the ranks to finish",
        "    (( caught && status > 128 )) || break",
        "done",
        'if (( requeue && status == 0 )); then',
        '    echo "recipec: checkpoint saved; requeueing job $SLURM_JOB_ID to resume from it"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'echo "recipec: ranks exited with status $status"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"
