"""Dropping old checkpoints (checkpoint.keep_last) without pausing training or leaving half of one.

Deleting a checkpoint took 5.5 s (llama32_1b, 16 GiB) and 7.3 s (8B layer shape, 19 GiB) on the
H200 machine's disk (session 7), in the training thread, once per save: more than the save's own
0.4 s pause. So pruning is two steps: each doomed `iter_N/` is renamed to `.pruning_iter_N/` at
once (a rename: atomic, so a crash never leaves a half-deleted `iter_N` that a resume would try),
and an `rm` process deletes the renamed directories while training goes on. A process, not a
thread: the next save forks its writer, and the rank's own threads stay out of that; and the
deletion finishes even if the rank is killed. The next save waits for it only if the disk is
short of space without the bytes being deleted. Whatever a crash leaves behind starts
with a dot, is never a resume candidate, and is removed by the next save (`remove_leftovers`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from . import ckpt_manifest as manifest

log = logging.getLogger("recipec.runtime")
PRUNING = ".pruning_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def complete_steps(root: Path) -> list[int]:
    """Steps with a renamed-into-place directory and a manifest (not checked further)."""
    return [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and (p / manifest.MANIFEST).exists()]


def prune(root: Path, keep_last: int, newest_verified: int) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints, never `newest_verified`; in
    this thread (Pruner deletes in the background)."""
    doomed = _retire(root, keep_last, newest_verified)
    for path in doomed.values():
        shutil.rmtree(path, ignore_errors=True)
    return list(doomed)


def remove_leftovers(root: Path) -> None:
    """What an interrupted save or prune left: `.tmp_iter_*` and `.pruning_iter_*` (rank 0, with the
    run lock held and no save pending, so nothing else is using them)."""
    for stale in [*root.glob(".tmp_iter_*"), *root.glob(f"{PRUNING}iter_*")]:
        shutil.rmtree(stale, ignore_errors=True)


class Pruner:
    """Prunes after each completed save; the deletion runs in a child process, one at a time."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root, self.keep_last = root, keep_last
        self._deleting: subprocess.Popen[bytes] | None = None
        self._bytes = 0  # what the running deletion frees

    def prune(self, newest_verified: int) -> list[int]:
        """Retire the doomed checkpoints now (a rename each) and delete them in the background."""
        self.wait()
        doomed = _retire(self.root, self.keep_last, newest_verified)
        if doomed:
            self._bytes = sum(manifest.total_bytes(path) for path in doomed.values())
            # argv, no shell: the paths are data (checkpoint.save comes from a recipe)
            self._deleting = subprocess.Popen(["rm", "-rf", "--", *map(str, doomed.values())],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE)
        return list(doomed)

    def reclaiming(self) -> int:
        """Bytes a still-running deletion will free (0 once it is done)."""
        if self._deleting is not None and self._deleting.poll() is None:
            return self._bytes
        return 0

    def wait(self) -> None:
        """Until the deletion is done (the end of the run, the next prune, a save short of space)."""
        proc, self._deleting = self._deleting, None
        if proc is None:
            return
        _, err = proc.communicate()
        if proc.returncode:  # the next save retries (remove_leftovers); nothing trained is at stake
            log.warning(f"could not delete pruned checkpoints under {self.root}: {err.decode(errors='replace')[-500:]}")


def _retire(root: Path, keep_last: int, newest_verified: int) -> dict[int, Path]:
    """Rename each doomed checkpoint out of the resume candidates; step -> where it went."""
    doomed = [s for s in sorted(complete_steps(root))[:-keep_last] if s != newest_verified]
    retired = {}
    for step in doomed:
        target = root / f"{PRUNING}{step_dir(root, step).name}"
        shutil.rmtree(target, ignore_errors=True)  # an earlier prune of the same step that died
        os.replace(step_dir(root, step), target)
        retired[step] = target
    if retired:
        manifest.fsync_dir(root)
    return retired
