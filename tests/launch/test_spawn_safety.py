"""Scripts are re-imported by multiprocessing's spawn start method (torch's default for workers):
importing recipec must start nothing, and the README's `if __name__ == "__main__":` pattern
must work for a user script that compiles recipes in spawned workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_SCRIPT = '''
import multiprocessing as mp
from recipec.compiler import build

def params(name):
    return build(name).plan.params_total

if __name__ == "__main__":
    with mp.get_context("spawn").Pool(2) as pool:
        print(pool.map(params, ["llama3_tiny", "llama3_8b"]))
'''

IMPORT_RUNTIME_IN_SPAWNED_CHILD = '''
import multiprocessing as mp

def probe(_):
    import torch.distributed as dist
    import recipec.runtime.train  # importing the entry point must not train or init anything
    return dist.is_initialized()

if __name__ == "__main__":
    with mp.get_context("spawn").Pool(1) as pool:
        print(pool.map(probe, [0]))
'''


def _run(tmp_path: Path, name: str, code: str) -> str:
    script = tmp_path / name
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_user_script_compiles_recipes_in_spawned_workers(tmp_path: Path) -> None:
    from recipec.compiler import build

    expected = [build(name).plan.params_total for name in ("llama3_tiny", "llama3_8b")]
    assert _run(tmp_path, "user.py", USER_SCRIPT) == str(expected)


def test_importing_the_runtime_entry_point_under_spawn_starts_nothing(tmp_path: Path) -> None:
    assert _run(tmp_path, "probe.py", IMPORT_RUNTIME_IN_SPAWNED_CHILD) == "[False]"
