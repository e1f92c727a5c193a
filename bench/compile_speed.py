"""Compile-time benchmark: median wall time of `recipec build` (a real subprocess, a cold
interpreter every run) and of the in-process `build()`, on the largest bundled recipe
(largest by plan params_total). Target: < 0.3 s median for the subprocess on a 2-core machine.

    python bench/compile_speed.py [--runs 10] [--recipe NAME]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipec.compiler import RecipeError, build
from recipec.compiler.loader import bundled_recipes


def largest_recipe() -> Path:
    sizes = []
    for path in bundled_recipes():
        try:
            sizes.append((build(path).plan.params_total, path.as_posix(), path))
        except RecipeError:
            continue  # a broken bundled recipe is test_library's business, not this benchmark's
    return max(sizes)[2]


def recipec_command() -> list[str]:
    exe = Path(sys.executable).with_name("recipec")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("recipec")
    return [found] if found else [sys.executable, "-m", "recipec.compiler.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--recipe", help="recipe to compile (default: the largest bundled one)")
    args = parser.parse_args()
    recipe = Path(args.recipe) if args.recipe else largest_recipe()
    compiled = build(recipe)
    print(f"recipe: {recipe.stem} ({compiled.plan.params_total / 1e9:.2f}B params), {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")

    command = [*recipec_command(), "build", str(recipe)]
    cold = []
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(command, cwd=work, check=True, capture_output=True)  # warm the OS file cache once
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(command, cwd=work, check=True, capture_output=True)
            cold.append(time.perf_counter() - start)

    warm = []
    for _ in range(max(args.runs, 20)):
        start = time.perf_counter()
        build(recipe)
        warm.append(time.perf_counter() - start)

    print(f"`{Path(command[0]).name} build` subprocess: median {statistics.median(cold):.3f} s "
          f"(min {min(cold):.3f}, max {max(cold):.3f}, {len(cold)} runs; target < 0.3 s)")
    print(f"in-process build():          median {statistics.median(warm) * 1000:.1f} ms "
          f"(min {min(warm) * 1000:.1f}, max {max(warm) * 1000:.1f}, {len(warm)} runs)")


if __name__ == "__main__":
    main()
