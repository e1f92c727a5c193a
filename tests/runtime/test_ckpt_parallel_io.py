"""Checkpoint files written and hashed several at a time (session 6, H200: one writer and one hashing
thread per rank reached 0.7-0.8 GB/s on a 1.4 GB/s disk, and hashing 16 GiB took 15 s).

The hashes must be exactly the one-file-at-a-time hashes (old manifests stay valid), and a
verification over many files must still name the first damaged file, whatever order the threads
finish in. The writer count follows the CPUs a rank has.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from recipec.runtime import ckpt_manifest as manifest
from recipec.runtime.ckpt_state import writer_count


def _files(directory: Path, count: int, size: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"__0_{i}.distcp"
        (directory / name).write_bytes(os.urandom(size) + bytes([i]))
        names.append(name)
    return names


def test_parallel_hashes_equal_one_by_one(tmp_path: Path) -> None:
    names = _files(tmp_path, 6, 3 << 20)
    together = manifest.hash_files(tmp_path, names)
    assert list(together) == names
    assert together == {name: manifest.hash_file(tmp_path / name) for name in names}


def test_verification_names_the_first_damaged_file(tmp_path: Path) -> None:
    names = _files(tmp_path, 6, 1 << 20)
    files = manifest.hash_files(tmp_path, names)
    assert manifest.check_files(tmp_path, files) is None
    for victim in (names[4], names[1]):  # damaged in place, sizes unchanged
        with open(tmp_path / victim, "r+b") as f:
            f.seek(1000)
            f.write(b"\xff" * 8)
    problem = manifest.check_files(tmp_path, files)
    assert problem is not None and problem.startswith(f"file {names[1]} has sha256")
    assert manifest.check_files(tmp_path, files, hashes=False) is None  # sizes alone cannot see it


@pytest.mark.parametrize(("cpus", "ranks", "writers"), [(16, "1", 8), (128, "8", 8), (2, "2", 1), (16, "8", 2),
                                                        (1, "4", 1), (4, None, 4)])
def test_writers_follow_the_cpus_of_a_rank(monkeypatch: pytest.MonkeyPatch, cpus: int, ranks: str | None,
                                           writers: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert writer_count() == writers
