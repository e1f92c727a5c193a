"""What makes a checkpoint directory trustworthy: per-file sizes and SHA-256 hashes, fsynced.

Why: a checkpoint corrupted in place without changing its size (a flipped 4 KB block in a
`.distcp`) loaded silently and training continued from garbage (loss 2.9 -> 8.9); sizes alone
cannot see that. Every file of a checkpoint is hashed after it was written, and resume checks
sizes and hashes before anything is loaded.

Hashing is split over the ranks by `owner()` (rank r hashes the `__r_*.distcp` files it wrote,
rank 0 the shared ones) and runs in a background thread (`Hasher`), because hashing inline
would grow the save stall by roughly the write time (sha256 runs at about 1.4 GB/s per core,
in the order of a local disk's write speed). hashlib and file reads release the GIL, so
training continues while it runs. The same thread fsyncs each file: Megatron fsyncs its
`.distcp` files but not `common.pt` or `metadata.json`.

A manifest written by an older recipec (or `recipec convert`) lists sizes only; it still
verifies, by size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST = "recipec_manifest.json"
HASH = "sha256"
_CHUNK = 8 << 20
_RANK_FILE = re.compile(r"^__(\d+)_")


def owner(name: str, world_size: int) -> int:
    """The rank that hashes (at save) or checks (at resume) file `name` of a checkpoint."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) % world_size if m else 0


def listing(directory: Path) -> list[str]:
    """The checkpoint's files (relative names), the manifest excluded."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"))


def hash_file(path: Path, *, fsync: bool = False) -> dict[str, Any]:
    """{"size", "sha256"} of `path`, read in chunks (GIL released); fsynced first if asked."""
    digest = hashlib.new(HASH)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        if fsync:
            os.fsync(f.fileno())
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return {"size": size, HASH: digest.hexdigest()}


def _map_threads(fn: Callable[[str], Any], names: list[str]) -> list[Any]:
    """fn over names, one thread per name up to 8: file reads and SHA-256 release the GIL, and one
    thread hashes about 1 GB/s, slower than the disks checkpoints go to (H200 machine: 1.4 GB/s)."""
    if len(names) <= 1:
        return [fn(name) for name in names]
    with ThreadPoolExecutor(max_workers=min(8, len(names)), thread_name_prefix="recipec-hash") as pool:
        return list(pool.map(fn, names))


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """hash_file (fsynced) of every name, several at once."""
    return dict(zip(names, _map_threads(lambda name: hash_file(directory / name, fsync=True), names)))


class Hasher(threading.Thread):
    """Hashes and fsyncs a list of files in the background; `result()` joins and returns them."""

    def __init__(self, directory: Path, names: list[str]) -> None:
        super().__init__(name="recipec-ckpt-hash", daemon=True)
        self.directory, self.names = directory, names
        self.files: dict[str, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.seconds = 0.0  # how long hashing took (for the save's log line)

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.files.update(hash_files(self.directory, self.names))
        except BaseException as exc:  # noqa: BLE001 - reported by result(), in the main thread
            self.error = exc
        self.seconds = time.perf_counter() - started

    def result(self) -> dict[str, dict[str, Any]]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync it, rename it, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(directory: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    write_durably(directory / MANIFEST, json.dumps({**meta, "hash": HASH, "files": files}, indent=1, sort_keys=True))


def read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, why it is not a complete checkpoint)."""
    path = directory / MANIFEST
    if not path.exists():
        return None, "no manifest (the save never finished)"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
            raise ValueError("not a recipec manifest")
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest ({exc})"
    return meta, None


def check_files(directory: Path, files: dict[str, Any], names: list[str] | None = None, *,
                hashes: bool = True) -> str | None:
    """Why the listed files do not match the manifest entries `files` (all, or `names`), or None.
    Sizes first (cheap, any order), then the hashes, several files at once."""
    to_hash: list[tuple[str, str]] = []
    for name in sorted(files) if names is None else names:
        entry = files[name]
        want = entry if isinstance(entry, int) else entry.get("size") if isinstance(entry, dict) else None
        path = directory / name
        if not isinstance(want, int) or ".." in Path(name).parts or Path(name).is_absolute():
            return f"manifest entry for {name!r} is malformed"
        if not path.is_file():
            return f"missing file {name}"
        size = path.stat().st_size
        if size != want:
            return f"file {name} is {size} bytes, expected {want} (truncated or overwritten)"
        if hashes and isinstance(entry, dict) and HASH in entry:
            to_hash.append((name, entry[HASH]))
    for (name, want), got in zip(to_hash, _map_threads(lambda name: hash_file(directory / name)[HASH],
                                                      [name for name, _ in to_hash])):
        if got != want:
            return f"file {name} has {HASH} {got[:16]}..., expected {want[:16]}... (corrupted in place)"
    return None


def verify(directory: Path) -> str | None:
    """Why `directory` is not a complete, intact checkpoint (sizes and hashes of every file), or None."""
    meta, problem = read_manifest(directory)
    if meta is None:
        return problem
    return check_files(directory, meta["files"])


def size_of(files: dict[str, Any]) -> int:
    """Bytes of the files a manifest lists (entries of either manifest generation)."""
    return sum(e if isinstance(e, int) else int(e.get("size", 0)) for e in files.values())


def total_bytes(directory: Path) -> int | None:
    """The size of a complete checkpoint according to its manifest (None when unreadable)."""
    meta, _ = read_manifest(directory)
    if meta is None:
        return None
    return size_of(meta["files"])
