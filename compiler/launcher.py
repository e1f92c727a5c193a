"""`recipec launch`: run a compiled artifact here with torchrun, or submit it to SLURM.

The recipe is compiled by `build()` like everywhere else; the launcher's own
flags (`--nodes`, `--gpus-per-node`, `--executor`, `--master`) are turned into
ordinary overrides first, so a node count that does not fit the parallel
layout is refused by the validator before anything starts or is submitted.

local:  one torchrun (`sys.executable -m torch.distributed.run`) for this node,
        c10d rendezvous. Ranks' output is streamed with a rank prefix, the exit
        code is torchrun's. SIGINT/SIGTERM (and USR1) go to the rank processes,
        which save a checkpoint and exit 0; the launcher then exits 128+signal.
        A second signal stops the torchrun process group outright.
        With nodes > 1 and no --node-rank it prints every node's command.
slurm:  BUILD_DIR/job.sbatch, submitted with `sbatch --parsable`; the job id is
        printed. --dry-run prints the script and submits nothing.

Nothing here imports torch; torchrun and sbatch are subprocesses.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import click

from .api import Compiled
from .errors import RecipeError
from .scripts import STREAM_ENV, node_argv, run_dir, sbatch_log, sbatch_script, shell_join

Echo = Callable[..., None]


class LaunchError(RecipeError):
    """A launch that cannot start: missing scheduler or torch, bad node rank, a refused submission."""


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
        out.append(f'launch.master_addr="{host}"')
        if port:
            out.append(f"launch.master_port={port}")
    return out


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
    echo: Echo = click.echo,
) -> int:
    """Check, write the build directory, then run or submit it. Returns the process exit code."""
    c = compiled.config
    executor = c.launch.executor
    rank = _node_rank(compiled, node_rank)
    if executor == "slurm":
        if rank is not None:
            raise LaunchError("--node-rank is for the local executor; under SLURM every node gets its rank "
                              "from $SLURM_NODEID")
        sbatch = None if dry_run else shutil.which("sbatch")
        if not dry_run and sbatch is None:
            raise LaunchError("`sbatch` is not on PATH, so the job cannot be submitted to SLURM; run this on a "
                              "SLURM login node, use --executor local, or --dry-run to print the job script")
        directory = compiled.write(out)
        return _slurm(compiled, directory, sbatch, echo)
    if executor != "local":  # the schema's choices make this unreachable; keep the message anyway
        raise LaunchError(f"unknown executor {executor!r}; choose local or slurm")
    if not dry_run and (c.launch.nodes == 1 or rank is not None) and importlib.util.find_spec("torch") is None:
        raise LaunchError(f"torch is not installed for {sys.executable}; install the runtime first: "
                          "pip install -e '.[runtime]'")
    directory = compiled.write(out)
    return _local(compiled, directory, rank, dry_run, echo)


# ---------------------------------------------------------------- slurm

def _slurm(compiled: Compiled, directory: Path, sbatch: str | None, echo: Echo) -> int:
    script = sbatch_script(compiled, python=sys.executable)
    path = directory / "job.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    if sbatch is None:  # dry run
        echo(script, nl=False)
        echo(f"recipec: dry run: wrote {path}; nothing submitted", err=True)
        return 0
    log = Path(sbatch_log(compiled))
    log.parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create the output directory
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused {path} (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip() or 'no message'}")
    job_id = proc.stdout.strip().split(";")[0]
    echo(job_id)
    echo(f"recipec: submitted {compiled.name} as SLURM job {job_id}; log "
         f"{str(log).replace('%x', compiled.name).replace('%j', job_id)}", err=True)
    return 0


# ---------------------------------------------------------------- local

def _local(compiled: Compiled, directory: Path, rank: int | None, dry_run: bool, echo: Echo) -> int:
    c, plan = compiled.config, compiled.plan
    nodes = c.launch.nodes
    env_lines = [f"export {k}={shell_join([v])}" for k, v in {**plan.env, **STREAM_ENV}.items()]
    if nodes > 1 and rank is None:
        echo(f"# {c.name}: {plan.world_size} processes on {nodes} nodes; no scheduler, so start one command "
             f"per node (node 0 at {c.launch.master_addr}:{c.launch.master_port} hosts the rendezvous),")
        echo("# or on each node: recipec launch ... --node-rank K --master ADDR_OF_NODE_0")
        for line in env_lines:
            echo(line)
        for k in range(nodes):
            echo(f"# node {k}")
            echo(shell_join(node_argv(compiled, k, python=sys.executable)))
        return 0
    argv = node_argv(compiled, rank or 0, python=sys.executable)
    if dry_run:
        for line in env_lines:
            echo(line)
        echo(shell_join(argv))
        echo(f"recipec: dry run: wrote {directory}; nothing started", err=True)
        return 0
    Path(run_dir(compiled), "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.env, **STREAM_ENV}
    echo(f"recipec: {c.name}: node {rank or 0} of {nodes}, {c.launch.gpus_per_node} process(es): "
         f"{shell_join(argv)}", err=True)
    return run_torchrun(argv, env, echo)


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's rank processes), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def run_torchrun(argv: Sequence[str], env: dict[str, str], echo: Echo = click.echo) -> int:
    """Run torchrun in its own process group; forward stop signals to its ranks; return its exit code.

    The first SIGINT/SIGTERM/SIGHUP reaches each rank as SIGTERM (USR1 as USR1): the runtime
    finishes the step, saves and exits 0, torchrun sees a clean finish, and this returns
    128 + the signal. Sending the signal to torchrun itself instead would make it SIGKILL
    the ranks 30 s later and fail with a traceback, so it only gets the second signal.
    """
    # USR1 ignored across exec: the torchrun agent must not die of it; ranks set their own handler.
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(list(argv), env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)

    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        ranks = _children(proc.pid) if len(received) == 1 else []
        try:
            if ranks:
                to_ranks = signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM
                echo(f"recipec: {name}: asking {len(ranks)} rank(s) to save a checkpoint and stop "
                     "(send it again to stop at once)", err=True)
                for pid in ranks:
                    try:
                        os.kill(pid, to_ranks)
                    except ProcessLookupError:
                        pass
            else:
                sig = signal.SIGKILL if len(received) > 2 else signal.SIGTERM
                echo(f"recipec: {name}: stopping torchrun ({signal.Signals(sig).name})", err=True)
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    handlers = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        code = proc.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if code < 0:  # torchrun itself died of a signal
        code = 128 - code
    if received and code == 0:
        echo(f"recipec: stopped on {signal.Signals(received[0]).name} after the ranks saved; "
             "run the same command again to resume from the checkpoint", err=True)
    if received and (code == 0 or len(received) > 1):
        return 128 + received[0]
    return code
