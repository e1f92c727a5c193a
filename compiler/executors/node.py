"""What one node runs, whatever started it: the torchrun command and launch.sh.

Both come from the plan alone. `node_argv` takes the plan's per-node torchrun command and

- maps `torchrun` to `PYTHON -m torch.distributed.run` when a Python is given (the venv that
  runs recipec, so its torch is the one used);
- fills in per-node values (node rank, rendezvous endpoint and id) — literal, or a
  `ShellVar` when a script reads them at run time ($SLURM_NODEID, $HEAD_NODE, $NODE_RANK);
- makes the rendezvous one that cannot collide (see rendezvous.py): a one-node job uses
  torchrun's `--standalone` store on a port the kernel picks, so launch.master_port is not
  used at all and a busy 29500 does not matter; a multi-node job meets at
  launch.master_addr:launch.master_port with its join timeout written out
  (`--rdzv-conf=join_timeout=600`), and where launch.master_addr is a loopback address, which
  no other machine can reach, the scripts read the head node's address from $HEAD_NODE;
- adds `--tee=3 --log-dir=RUN_DIR/logs/torchrun`: every rank's stdout/stderr is streamed with
  a `[default<local rank>]:` prefix and kept per rank on disk;
- runs each rank under nsys (`profiling.use_nsys`) with the capture range opened and closed
  by the runtime at the configured steps.

`supervised` wraps it in `python -m recipec.compiler.supervisor --`, so stop signals reach
the ranks and not torchrun's agent (see supervisor.py). Nothing here imports torch.
"""

from __future__ import annotations

from ..rendezvous import JOIN_TIMEOUT_S, is_loopback
from ..shell import Arg, Script, ShellVar, Word, word
from .base import Built

TORCHRUN_MODULE = "torch.distributed.run"
SUPERVISOR_MODULE = "recipec.compiler.supervisor"
# Launcher-side environment: unbuffered ranks so their lines stream as they happen.
STREAM_ENV = {"PYTHONUNBUFFERED": "1"}
NODE_RANK = ShellVar("NODE_RANK")
HEAD_NODE = ShellVar("HEAD_NODE")
# The plan's rendezvous flags, which `--standalone` replaces on a one-node job.
RDZV_FLAGS = ("--rdzv-backend", "--rdzv-endpoint", "--rdzv-id")
# (no apostrophe in these messages: bash reads one inside "${VAR:?...}" as an opening quote)
NEED_HEAD_NODE = ('HEAD_NODE="${HEAD_NODE:?set HEAD_NODE to the address of node 0 (launch.master_addr is a loopback '
                  'address, which the other nodes cannot reach)}"')


def run_dir(built: Built) -> str:
    """launch.output_dir with {name} filled in: logs, torchrun rank logs and nsys reports go here."""
    return built.config.launch.output_dir.replace("{name}", built.config.name)


def environment(built: Built) -> dict[str, str]:
    """What every script exports: the plan's performance environment, then streaming."""
    return {**built.plan.env, **STREAM_ENV}


def nsys_prefix(built: Built) -> list[str]:
    """The per-rank nsys wrapper; the capture range is opened and closed by the runtime (cudaProfilerApi)."""
    return [
        "nsys", "profile",
        "-c", "cudaProfilerApi",
        "--capture-range-end=stop",
        "--force-overwrite=true",
        "-o", f"{run_dir(built)}/nsys/{built.config.name}-rank%q{{RANK}}",
    ]


def head_endpoint(built: Built) -> Word | None:
    """$HEAD_NODE:PORT when the job has several nodes and launch.master_addr is a loopback address
    (the default 127.0.0.1): that endpoint would send every other node to itself. Else None."""
    launch = built.config.launch
    if launch.nodes > 1 and is_loopback(launch.master_addr):
        return word(HEAD_NODE, f":{launch.master_port}")
    return None


def _option(flag: str, value: Arg | int) -> Arg:
    if isinstance(value, ShellVar):
        return word(f"{flag}=", value)
    if isinstance(value, Word):
        return Word((f"{flag}=", *value.parts))
    return f"{flag}={value}"


def node_argv(
    built: Built,
    node_rank: Arg | int = 0,
    *,
    python: str | None = None,
    nnodes: Arg | int | None = None,
    rdzv_endpoint: Arg | None = None,
    rdzv_id: Arg | None = None,
) -> list[Arg]:
    """The torchrun command one node runs: the plan's, made runnable (see the module doc)."""
    c = built.config
    base = list(built.plan.node_commands[0])
    if not base or base[0] != "torchrun" or "-m" not in base:
        raise ValueError(f"unexpected plan command {base!r}")
    split = base.index("-m")
    replace: dict[str, Arg | int | None] = {
        "--node-rank": node_rank,
        "--nnodes": nnodes,
        "--rdzv-endpoint": rdzv_endpoint,
        "--rdzv-id": rdzv_id,
    }
    single = c.launch.nodes == 1
    options: list[Arg] = []
    for arg in base[1:split]:
        flag = arg.split("=", 1)[0]
        if single and flag in RDZV_FLAGS:
            if flag == RDZV_FLAGS[0]:
                options.append("--standalone")
            continue
        value = replace.get(flag)
        options.append(arg if value is None else _option(flag, value))
        if flag == "--rdzv-id" and not any(a.startswith("--rdzv-conf") for a in base):
            options.append(f"--rdzv-conf=join_timeout={JOIN_TIMEOUT_S}")
    options += [f"--log-dir={run_dir(built)}/logs/torchrun", "--tee=3"]
    rank_command: list[Arg] = list(base[split:])  # -m recipec.runtime.train --artifact DIR
    if c.profiling.use_nsys:
        rank_command = ["--no-python", *nsys_prefix(built), python or "python", *rank_command]
    head: list[Arg] = [python, "-m", TORCHRUN_MODULE] if python else ["torchrun"]
    return head + options + rank_command


def supervised(torchrun: list[Arg], python: str | None = None) -> list[Arg]:
    """torchrun under recipec's supervisor (stop signals to the ranks; exit 0 after a clean save)."""
    return [python or "python", "-m", SUPERVISOR_MODULE, "--", *torchrun]


def launch_sh(built: Built, python: str | None = None) -> str:
    """launch.sh: this node's share of the job (NODE_RANK picks the node when nodes > 1)."""
    c, plan = built.config, built.plan
    script = Script()
    script.comment(f"recipec {c.name}: {plan.world_size} processes on {c.launch.nodes} node(s)")
    script.comment(f"fingerprint {built.fingerprint}")
    script.code("set -euo pipefail")
    script.exports(environment(built))
    rank: Arg | int = 0
    if c.launch.nodes > 1:
        last = int(c.launch.nodes) - 1
        script.code(f'NODE_RANK="${{NODE_RANK:?set NODE_RANK to the index of this node (0..{last})}}"')
        rank = NODE_RANK
    endpoint = head_endpoint(built)
    if endpoint is not None:
        script.code(NEED_HEAD_NODE)
    torchrun = node_argv(built, rank, python=python, rdzv_endpoint=endpoint)
    script.command(supervised(torchrun, python), before="exec ", after=' "$@"')
    return script.text()
