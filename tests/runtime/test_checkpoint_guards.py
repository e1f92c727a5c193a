"""The checkpoint guards one by one, without training: hashes, pruning, disk-full detection, the
run lock, and the fate of processes forked by a rank (seconds, no torchrun).

The end-to-end faults (through torchrun, with the exit codes and the steps lost) are in
test_checkpoint_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recipec.runtime import ckpt_manifest as manifest


def _checkpoint(directory: Path, step: int, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    hashed = {name: manifest.hash_file(directory / name) for name in files}
    manifest.write_manifest(directory, {"step": step}, hashed)
    return directory


def test_hashes_catch_corruption_of_the_same_size(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "iter_0000005", 5, {"__0_0.distcp": os.urandom(10_000), "common.pt": b"x" * 100})
    assert manifest.verify(d) is None
    data = bytearray((d / "__0_0.distcp").read_bytes())
    data[4096:8192] = bytes(b ^ 0xFF for b in data[4096:8192])
    (d / "__0_0.distcp").write_bytes(bytes(data))
    assert "corrupted in place" in (manifest.verify(d) or "")
    (d / "__0_0.distcp").write_bytes(bytes(data[:5000]))
    assert "truncated" in (manifest.verify(d) or "")


def test_older_manifests_verify_by_size_and_malformed_entries_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "iter_0000001"
    d.mkdir()
    (d / "a.distcp").write_bytes(b"abc")
    (d / manifest.MANIFEST).write_text(json.dumps({"step": 1, "files": {"a.distcp": 3}}))
    assert manifest.verify(d) is None
    (d / manifest.MANIFEST).write_text(json.dumps({"step": 1, "files": {"../../etc/passwd": 3}}))
    assert "malformed" in (manifest.verify(d) or "")
    (d / manifest.MANIFEST).write_text("[1, 2")
    assert "unreadable manifest" in (manifest.verify(d) or "")


def test_owner_spreads_rank_files_and_keeps_shared_ones_on_rank_0() -> None:
    assert [manifest.owner(n, 2) for n in ("__0_0.distcp", "__1_1.distcp", "__3_0.distcp", "common.pt")] == [0, 1, 1, 0]


def test_pruning_keeps_the_newest_and_never_the_newest_verified(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from recipec.runtime.checkpoint import bad_checkpoints, complete_steps, prune

    for step in (5, 10, 20):
        _checkpoint(tmp_path / f"iter_{step:07d}", step, {"f": b"1"})
    (tmp_path / "iter_0000015.bad").mkdir()
    (tmp_path / "iter_0000025").mkdir()  # no manifest: never complete, never counted
    # iter_20 was left by another run; this run just completed iter_10 (its newest verified one).
    assert prune(tmp_path, keep_last=1, newest_verified=10) == [5]
    assert sorted(complete_steps(tmp_path)) == [10, 20]
    assert [p.name for p in bad_checkpoints(tmp_path)] == ["iter_0000015.bad"]


def test_background_pruning_retires_at_once_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """The doomed checkpoint leaves the resume candidates before prune() returns (a rename), its
    files go in a child process (argv, no shell: the path is the recipe's), and what a crash
    mid-delete leaves is removed by the next save."""
    pytest.importorskip("megatron.core")
    from recipec.runtime.ckpt_prune import Pruner, complete_steps, remove_leftovers

    root = tmp_path / "-ck pt;$(touch pwned)`touch pwned2`'\"*"  # a checkpoint.save a recipe may hold
    for step in (5, 10, 20):
        _checkpoint(root / f"iter_{step:07d}", step, {"f": b"1" * 4096})
    pruner = Pruner(root, keep_last=1)
    assert pruner.prune(newest_verified=20) == [5, 10]
    assert sorted(complete_steps(root)) == [20]  # already, whatever the deleting process has done
    pruner.wait()
    assert pruner.reclaiming() == 0
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # nothing ran from the path
    # a prune killed mid-delete, and a save killed mid-write
    (root / ".pruning_iter_0000015").mkdir()
    (root / ".pruning_iter_0000015" / "__0_0.distcp").write_bytes(b"x")
    (root / ".tmp_iter_0000025").mkdir()
    remove_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000020"]


def test_a_relaunch_with_only_bad_checkpoints_stops_instead_of_starting_over(tmp_path: Path, mcore_tp1: None) -> None:
    from recipec.runtime.checkpoint import (
        CheckpointUnusableError,
        has_checkpoints,
        load_latest,
    )

    bad = tmp_path / "iter_0000010.bad"
    bad.mkdir()
    (bad / "RECIPEC_BAD.txt").write_text("file __0_0.distcp has sha256 ab..., expected cd... (corrupted in place)\n")
    assert has_checkpoints(tmp_path)
    with pytest.raises(CheckpointUnusableError, match=r"iter_0000010.bad \(marked bad earlier: file __0_0.distcp"):
        load_latest(tmp_path, [], None, None, "", mark_bad=True)


def test_a_full_disk_is_recognised_anywhere_in_the_cause_chain() -> None:
    pytest.importorskip("megatron.core")
    from recipec.runtime.ckpt_disk import says_disk_full
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, "No space left on device")
    assert says_disk_full(CheckpointException("write", {1: (full, None)}))  # a BaseException, per rank
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598") from exc
    except RuntimeError as wrapped:
        assert says_disk_full(wrapped)
    assert says_disk_full(RuntimeError("write failed: Disk quota exceeded"))
    assert not says_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not says_disk_full(None)


def _python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_the_run_lock_refuses_a_live_holder_and_ignores_a_dead_one(tmp_path: Path) -> None:
    from recipec.runtime.run_lock import RunDirectoryBusyError, RunLock

    # The holder forks a child that outlives it: the child must not keep the lock alive.
    holder = _python(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from recipec.runtime.run_lock import RunLock\n"
        f"lock = RunLock(); lock.acquire([Path({str(tmp_path)!r})])\n"
        "if os.fork() == 0:\n"
        "    os.write(1, b'child\\n'); time.sleep(10); os._exit(0)\n"
        "os.write(1, b'locked\\n'); time.sleep(60)\n")
    try:
        assert holder.stdout is not None
        assert {holder.stdout.readline().strip(), holder.stdout.readline().strip()} == {"locked", "child"}
        with pytest.raises(RunDirectoryBusyError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock().acquire([tmp_path])
        holder.kill()
        holder.wait()
        lock = RunLock()
        lock.acquire([tmp_path])  # the dead holder's .lock (and its live child) do not block
        assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
        lock.release()
    finally:
        holder.kill()


def test_forked_children_ignore_stop_signals_in_a_save_and_die_with_their_rank() -> None:
    pytest.importorskip("megatron.core")
    rank = _python(
        "import os, queue, signal, time\n"
        "from recipec.runtime.ckpt_workers import protected_writers\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async as fa\n"
        "with protected_writers():\n"
        "    assert isinstance(fa._results_queue, queue.Queue)  # no Manager process\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60); os._exit(0)\n"
        "assert fa._results_queue is None\n"
        "time.sleep(0.5); os.kill(pid, signal.SIGTERM); time.sleep(0.5)\n"
        "print(pid, os.waitpid(pid, os.WNOHANG) == (0, 0), flush=True); time.sleep(60)\n")
    try:
        assert rank.stdout is not None
        child, survived = rank.stdout.readline().split()
        assert survived == "True", "a writer forked during a save died of SIGTERM"
        rank.kill()  # kill -9: nothing may outlive it
        rank.wait()
        deadline = time.monotonic() + 5
        while _running(int(child)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(int(child)), "a process forked by the rank outlived it"
    finally:
        rank.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False



def test_staging_memory_is_prepared_only_when_a_periodic_save_comes() -> None:
    """After the first step the Saver prepares the async saves' host memory (pinned_staging), unless
    the run's only save left is its final one (which stages another format)."""
    pytest.importorskip("megatron.core")
    from recipec.runtime.loop import _periodic_save_ahead

    assert _periodic_save_ahead(1, 5, 12)  # saves at 5 and 10 come before the last step
    assert _periodic_save_ahead(5, 5, 12)  # step 5 itself saves
    assert not _periodic_save_ahead(11, 5, 12)
    assert not _periodic_save_ahead(1, 12, 12)  # the only save is the final one
    assert not _periodic_save_ahead(1, None, 12)


def test_staging_memory_is_not_prepared_beyond_what_the_node_has() -> None:
    """Every rank of the node holds its share; touching more than 80% of the available memory would
    bring the OOM killer, so the Saver declines and the saves stage as Megatron does."""
    pytest.importorskip("megatron.core")
    from recipec.runtime.pinned_staging import available_memory, room_for

    gib = 2**30
    assert room_for(16 * gib, 1, 100 * gib)
    assert not room_for(16 * gib, 8, 100 * gib)  # 128 GiB for 8 ranks of one node
    assert room_for(10 * gib, 8, 100 * gib)
    assert room_for(16 * gib, 8, None)  # no /proc/meminfo: as before, the save pins what it needs
    assert available_memory() is None or available_memory() > 0
