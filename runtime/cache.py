"""Data caches (text packs, tokenized SFT files): keyed by content, published atomically, built once.

Key. A cache entry is named by what its content depends on, so a changed input can never be
answered from a stale entry. For an input file that is `content_key(path)`:

- files up to `FULL_HASH_BYTES` (64 MiB): the sha256 of the whole file. Exact; reading and
  hashing 64 MiB costs well under a second, and an unchanged copy or a `touch` reuses the entry.
- larger files: size + mtime_ns + the sha256 of the first and last `EDGE_BYTES` (1 MiB each).
  Hashing a multi-GB corpus on every start would cost more than the cache saves; any ordinary
  write changes the size or the mtime, and appends and header rewrites change an edge. The one
  miss is an edit of the middle that keeps the size and restores the mtime by hand.

Publish. An entry is written under a temporary name unique to host, process and call, then
renamed into place (`os.replace`, atomic on one file system); a reader sees the whole entry or
none. Two ranks that race write identical bytes (same key, same content), so the last rename wins
harmlessly.

Build once. `build_once` lets rank 0 build while the other ranks wait, and sends rank 0's error
(a RecipeError naming the file and line) to every rank so they all exit 2 with it; a rank that
does not see the entry afterwards (no shared file system) builds its own copy.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from recipec.compiler.errors import RecipeError

FULL_HASH_BYTES = 64 * 1024 * 1024
EDGE_BYTES = 1024 * 1024
_BLOCK = 1024 * 1024


def content_key(path: str | Path) -> str:
    """What a cache entry built from file `path` depends on (see the module docstring)."""
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(handle.read(EDGE_BYTES))
        handle.seek(-EDGE_BYTES, os.SEEK_END)
        digest.update(handle.read(EDGE_BYTES))
    return f"size:{size}|mtime_ns:{os.stat(path).st_mtime_ns}|edges:{digest.hexdigest()}"


def short_hash(*parts: object) -> str:
    """12 hex digits naming a cache entry: the sha256 of its key parts."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def temp_path(target: Path, suffix: str = "") -> Path:
    """A sibling of `target` no other process (on any host sharing the directory) will pick."""
    tag = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    return target.with_name(f".{target.name}.{tag}.tmp{suffix}")


def build_once(ready: Callable[[], bool], build: Callable[[], None]) -> None:
    """Make `ready()` true: rank 0 builds (the others wait), errors are raised on every rank."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    error: list[str | None] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            if not ready():
                build()
        except Exception as exc:  # tell the waiting ranks, then fail here with the original error
            error[0] = str(exc) if isinstance(exc, RecipeError) else f"rank 0 could not build a data cache: {exc!r}"
            if distributed:
                dist.broadcast_object_list(error, src=0)
            raise
    if distributed:  # (rank 0 got here only without an error)
        dist.broadcast_object_list(error, src=0)  # also the barrier: rank 0 has finished writing
        if error[0] is not None:
            raise RecipeError(error[0])
    if not ready():  # a node that does not share rank 0's file system
        build()
