"""The SLURM executor: BUILD_DIR/job.sbatch, submitted with `sbatch --parsable`.

One task per node runs the supervised torchrun (see supervisor.py). USR1 before the time
limit (and TERM on scancel of the batch script) → every rank saves and exits 0 → the job
requeues itself (after USR1) and the next start resumes from that checkpoint.
--dry-run prints the script and submits nothing.

The `[launch]` settings only this executor reads (slurm_*, container_*, preempt_grace_s)
are checked here: values that land on `#SBATCH` lines must be plain text there, because
SLURM parses those lines itself (whitespace, quotes, backslashes and `#` mean something).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..shell import (
    Arg,
    Script,
    ShellVar,
    bash_c,
    directive_value,
    script_text_problem,
    word,
)
from ..supervisor import VERBOSE_ENV
from .base import Built, Echo, Finding, LaunchError, ScriptFile
from .node import HEAD_NODE, environment, launch_sh, node_argv, run_dir, supervised

if TYPE_CHECKING:
    from ..schema import RecipeConfig

# Per-task shell variables on a SLURM node; the values torchrun gets there.
NODE_ID = ShellVar("SLURM_NODEID")
NNODES = ShellVar("SLURM_NNODES")
JOB_ID = ShellVar("SLURM_JOB_ID")
SUBMIT_DIR = ShellVar("SLURM_SUBMIT_DIR")

# Template code of job.sbatch (literals; data goes in only through Script's quoting methods).
_HEAD = (
    'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    '[[ -n $HEAD_NODE ]] || { echo "recipec: no head node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1; }',
    "export HEAD_NODE",
    ('echo "recipec: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), '
     'head $HEAD_NODE, $(date -u +%FT%TZ)"'),
)
_FORWARD = (
    "requeue=0",
    "caught=0",
    "signals=0",
    "forward() {",
    "    caught=1",
    "    signals=$((signals + 1))",
    '    if [[ $1 == USR1 && $REQUEUE_ON_USR1 == 1 ]]; then requeue=1; fi',
    "    if (( signals == 1 )); then",
    '        echo "recipec: SIG$1 received; asking the ranks to save a checkpoint and stop"',
    "        # USR1 whatever came in: srun hands it to every process of the step, and the torchrun",
    "        # agent ignores USR1, where TERM would make it kill the ranks' checkpoint writers.",
    '        kill -s USR1 "$SRUN_PID" 2>/dev/null || true',
    "    else",
    '        echo "recipec: SIG$1 received again; stopping the ranks now"',
    '        kill -s TERM "$SRUN_PID" 2>/dev/null || true',
    "    fi",
    "}",
    "trap 'forward USR1' USR1",
    "trap 'forward TERM' TERM",
)
_WAIT = (
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
)
# The task ignores USR1 until the supervisor has its handler (an early one must not kill it).
_TASK_PREFIX = 'trap "" USR1; exec '


def sbatch_log(built: Built) -> str:
    """The job's output file pattern (%x job name, %j job id); its directory must exist before sbatch."""
    return f"{run_dir(built)}/logs/%x-%j.out"


class SlurmExecutor:
    name = "slurm"
    script_names = ("launch.sh", "job.sbatch")

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        launch = config.launch
        directive_fields = {
            "slurm_account": launch.slurm_account,
            "slurm_partition": launch.slurm_partition,
            "slurm_time": launch.slurm_time,
            "output_dir": launch.output_dir,  # in `#SBATCH --output=`
        }
        for key, value in directive_fields.items():
            if value is None or script_text_problem(value):
                continue  # a newline or NUL is reported by the shared rule
            try:
                directive_value(value)
            except ValueError:
                message = (f"{value!r} cannot go on an #SBATCH line: SLURM splits those lines at whitespace and "
                           "reads quotes, backslashes and `#` itself")
                yield (("launch", key), message, "use plain text (letters, digits, / . _ - : , = @ + %)")

    def scripts(self, built: Built, python: str | None = None) -> list[ScriptFile]:
        return [ScriptFile("launch.sh", launch_sh(built, python)), ScriptFile("job.sbatch", sbatch_script(built, python))]

    def launch(self, built: Built, *, out: str | None, dry_run: bool, node_rank: int | None, echo: Echo,
               verbose: bool = False) -> int:
        if node_rank is not None:
            raise LaunchError("--node-rank is for the local executor; under SLURM every node gets its rank "
                              "from $SLURM_NODEID")
        sbatch = None if dry_run else shutil.which("sbatch")
        if not dry_run and sbatch is None:
            raise LaunchError("`sbatch` is not on PATH, so the job cannot be submitted to SLURM; run this on a "
                              "SLURM login node, use --executor local, or --dry-run to print the job script")
        directory = built.write(out, python=sys.executable)
        path = directory / "job.sbatch"
        if sbatch is None:  # dry run
            echo(path.read_text(), nl=False)
            echo(f"recipec: dry run: wrote {path}; nothing submitted", err=True)
            return 0
        log = Path(sbatch_log(built))
        log.parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create the output directory
        # sbatch hands the submitting environment to the job (--export=ALL), so --verbose reaches every task.
        env = {**os.environ, VERBOSE_ENV: "1"} if verbose else None
        proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise LaunchError(f"sbatch refused {path} (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip() or 'no message'}")
        job_id = proc.stdout.strip().split(";")[0]
        echo(job_id)
        echo(f"recipec: submitted {built.name} as SLURM job {job_id}; log "
             f"{str(log).replace('%x', built.name).replace('%j', job_id)}", err=True)
        return 0


def task_argv(built: Built, python: str | None = None) -> list[Arg]:
    """What srun starts on each node: the supervised torchrun, with the node's values from SLURM."""
    launch = built.config.launch
    if launch.container_image:
        python = None  # the image's torchrun and python
    torchrun = node_argv(built, NODE_ID, python=python, nnodes=NNODES,
                         rdzv_endpoint=word(HEAD_NODE, f":{launch.master_port}"), rdzv_id=JOB_ID)
    return supervised(torchrun, python)


def sbatch_script(built: Built, python: str | None = None) -> str:
    """job.sbatch. `python` is the interpreter on the nodes that has torch and recipec (recipec launch
    passes its own, which suits a shared filesystem); with a container image it is the image's."""
    c, plan = built.config, built.plan
    launch = c.launch
    script = Script()
    sbatch = "#SBATCH"
    script.directive(sbatch, "--job-name", c.name)
    script.directive(sbatch, "--nodes", launch.nodes)
    script.directive(sbatch, "--ntasks-per-node", 1)
    if launch.accelerator != "cpu":
        script.directive(sbatch, "--gpus-per-node", launch.gpus_per_node)
    else:
        script.directive(sbatch, "--cpus-per-task", launch.gpus_per_node)
    script.directive(sbatch, "--time", launch.slurm_time)
    if launch.slurm_account:
        script.directive(sbatch, "--account", launch.slurm_account)
    if launch.slurm_partition:
        script.directive(sbatch, "--partition", launch.slurm_partition)
    if launch.slurm_exclusive:
        script.directive(sbatch, "--exclusive")
    script.directive(sbatch, "--output", sbatch_log(built))
    script.directive(sbatch, "--open-mode", "append")  # a requeued job appends to the same log
    script.directive(sbatch, "--signal", f"B:USR1@{launch.preempt_grace_s}")
    if launch.slurm_requeue:
        script.directive(sbatch, "--requeue")
    script.comment(f"recipec {c.name}: {plan.world_size} processes on {launch.nodes} node(s); "
                   f"fingerprint {built.fingerprint}")
    script.code("set -uo pipefail")
    script.exports(environment(built))
    script.code(*_HEAD).blank()
    script.comment(f"Preemption: SLURM sends USR1 here {launch.preempt_grace_s}s before the time limit (and TERM on")
    script.comment("scancel/preemption). The ranks save a checkpoint and exit 0; after USR1 the job requeues")
    script.comment("itself and the next start resumes from that checkpoint. A second signal stops them at once.")
    script.assign("REQUEUE_ON_USR1", 1 if launch.slurm_requeue else 0)
    script.code(*_FORWARD).blank()

    srun: list[Arg] = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if launch.accelerator == "cpu":
        srun.append(f"--cpus-per-task={launch.gpus_per_node}")
    if launch.container_image:
        srun.append(f"--container-image={launch.container_image}")
        if launch.container_mounts:
            srun.append(f"--container-mounts={','.join(launch.container_mounts)}")
        srun.append(word("--container-workdir=", SUBMIT_DIR))
    script.command([*srun, *bash_c(_TASK_PREFIX, task_argv(built, python))], after=" &")
    script.code(*_WAIT)
    return script.text()


EXECUTOR = SlurmExecutor()
