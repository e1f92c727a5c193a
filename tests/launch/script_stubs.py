"""Run generated scripts for real, with stub executables that only record what they were given.

`StubBin(dir)` writes `torchrun`, `python`, `srun`, `scontrol` and `sbatch` into a folder
that goes first on PATH. Each stub is a Python script (run isolated, `-I`, so a recipe's
PYTHON* variables cannot change it) that appends its program name, argv and environment
to a JSON-lines log and exits 0. `srun` then runs the command after its own options
(`bash -c BODY`), so the job's per-node task runs as well; `scontrol show hostnames`
prints one host name.

`expand(argv, env)` turns the renderer's words (str, ShellVar, Word) into the strings a
shell with `env` would pass on: what a stub must have seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from recipec.compiler.shell import Arg, ShellVar, Word

HEAD = "node0001"
NAMES = ("torchrun", "python", "srun", "scontrol", "sbatch")
SLURM_ENV = {
    "SLURM_JOB_NODELIST": "node[0001]",
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NODEID": "0",
}

_STUB = '''#!{python} -I
import json, os, sys
prog = os.path.basename(sys.argv[0])
with open({log!r}, "a") as f:
    f.write(json.dumps({{"prog": prog, "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if prog == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print({head!r})
if prog == "srun":
    rest = sys.argv[1:]
    while rest and rest[0].startswith("--"):
        rest = rest[1:]
    if rest:
        os.execvp(rest[0], rest)
'''


class StubBin:
    """A PATH folder of recording stubs, and the log they write."""

    def __init__(self, folder: Path, names: Sequence[str] = NAMES, head: str = HEAD) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = folder / "calls.jsonl"
        for name in names:
            path = folder / name
            path.write_text(_STUB.format(python=sys.executable, log=str(self.log), head=head))
            path.chmod(0o755)

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def reset(self) -> None:
        self.log.unlink(missing_ok=True)

    def run(self, script: Path, cwd: Path, extra_env: Mapping[str, str] = {}) -> subprocess.CompletedProcess:
        """`bash SCRIPT` in `cwd` with only the stubs and the system's bin folders on PATH."""
        env = {"PATH": f"{self.folder}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8", **extra_env}
        return subprocess.run(["bash", str(script)], cwd=cwd, env=env, check=False, capture_output=True, timeout=60)


def expand(argv: Sequence[Arg], env: Mapping[str, str]) -> list[str]:
    """What a shell passes on for the renderer's words, given the values of the shell variables."""
    out = []
    for a in argv:
        if isinstance(a, ShellVar):
            out.append(env[a.name])
        elif isinstance(a, Word):
            out.append("".join(env[p.name] if isinstance(p, ShellVar) else p for p in a.parts))
        else:
            out.append(a)
    return out


def job_env(cwd: Path) -> dict[str, str]:
    """The variables SLURM gives a batch script and its tasks (one node)."""
    return {**SLURM_ENV, "SLURM_SUBMIT_DIR": str(cwd)}
