"""Writing checkpoints that never lie: atomic, hashed, fsynced, pruned without losing the newest.

Layout under `checkpoint.save`:

    iter_0000050/      a complete checkpoint (model, optimizer, scheduler, RNG, step, fingerprint)
                       with recipec_manifest.json: every file's size and SHA-256, and the
                       resolved [model] it was trained with (ckpt_compat)
    iter_0000040.bad/  a checkpoint that failed verification or loading (kept for inspection)
    latest             the newest complete step (information; resume scans the directories)
    .lock              the run lock (runtime/run_lock.py)

A save is two collective steps. `Saver.save()` writes `.tmp_iter_N/` with Megatron's
dist_checkpointing and returns: the training loop continues while a background thread on each
rank hashes and fsyncs the files that rank owns (ckpt_manifest.owner). `Saver.poll()` (at the
loop's flush points) and `Saver.finish()` (before the next save and at the end) then gather the
hashes, write the manifest, fsync it and the directory, and only then rename the directory into
place and prune. Until that rename a crash or a signal leaves the previous checkpoints as they
were; `finish()` runs before any stop, so a stop signal always ends in a complete checkpoint.

With `async_save` (checkpoint.async_save, on by default on GPU) save() returns even earlier:
Megatron plans the save and writes common.pt, the state is staged to host memory (pinned, on
GPU), and a forked process per rank writes and hashes that rank's files while training goes on
(ckpt_workers.BackgroundWrite). Megatron's finalize callbacks (its `.metadata`, metadata.json)
run at poll()/finish() once every rank's writer is done, and then the manifest and rename as
above; a crash before that leaves `.tmp_iter_N/` (removed by the next save) and `latest` where
it was. Only one save is in flight: the next save(), a stop and the end of the run wait for it.

Saves are fully parallel over data-parallel ranks (Megatron's FullyParallelSaveStrategyWrapper):
each DP rank writes its share of the DP-replicated tensors instead of DP rank 0 writing them all.

Every failure is agreed on by all ranks (one all-reduce of a flag), so a failure on one rank
cannot leave the others waiting in a collective or continuing alone. A full disk (ENOSPC or
EDQUOT anywhere in the exception chain, a failing probe write, or less free space than the
previous checkpoint took; runtime/ckpt_disk.py) is reported as "disk full at <path>" (exit 2),
the partial directory is removed, and the previous checkpoint is untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from recipec.compiler.errors import RecipeError

from . import ckpt_manifest as manifest
from .ckpt_disk import (
    free_bytes,
    full_message,
    os_error,
    probe_full,
    says_disk_full,
    tree_bytes,
)
from .ckpt_prune import Pruner, complete_steps, remove_leftovers, step_dir
from .ckpt_state import layout, save_strategy, sharded_state
from .ckpt_workers import BackgroundWrite, ResultBox, protected_writers
from .logs import size as human_size
from .pinned_staging import (
    StagingArena,
    available_memory,
    matches,
    room_for,
    staged_sizes,
)

log = logging.getLogger("recipec.runtime")
LATEST = "latest"


class DiskFullError(RecipeError):
    """The checkpoint does not fit on its file system; the previous one is intact."""


class CheckpointSaveError(RecipeError):
    """The file system refused a checkpoint write (permissions, read-only, I/O error)."""


@dataclass
class _Pending:
    step: int
    tmp: Path
    final: Path
    hasher: manifest.Hasher | None  # a synchronous save's hashing thread
    meta: dict[str, Any]
    stall_s: float = 0.0  # how long save() held up training
    write_s: float = 0.0  # of which Megatron's write of the files (sync), or the background write (async)
    background: BackgroundWrite | None = None  # an async save's writer process

    def busy(self) -> bool:
        return self.background.busy() if self.background is not None else bool(self.hasher and self.hasher.is_alive())


class Saver:
    """Saves checkpoints under `root`; collective: every rank calls every method at the same step."""

    def __init__(self, root: Path, fingerprint: str, keep_last: int | None, sharding: str,
                 device: torch.device, model: dict[str, Any] | None = None, async_save: bool = False) -> None:
        """model: what the manifest records about the model (ckpt_compat.model_record), so a resume
        with another model is refused by name instead of failing inside the loader.
        async_save: write in a background process (see the module docstring)."""
        self.root, self.fingerprint, self.keep_last, self.sharding = root, fingerprint, keep_last, sharding
        self.device, self.model, self.async_save = device, model or {}, async_save
        self.pending: _Pending | None = None
        self.arena: StagingArena | None = None  # host memory the async saves stage into (pinned_staging)
        self._arena_reported = False
        self.pruner = Pruner(root, keep_last) if keep_last else None

    def close(self) -> Path | None:
        """The end of the run: the pending checkpoint completed (its path) and old ones deleted."""
        completed = self.finish()
        if self.pruner is not None:
            self.pruner.wait()
        return completed

    def reserve_staging(self, chunks: list[Any], optimizer: Any, scheduler: Any) -> None:
        """Start preparing the host memory the async saves stage into (runtime/pinned_staging.py), so
        the first save does not pin it while training waits. Collective over data-parallel ranks."""
        if not self.async_save or optimizer is None or self.arena is not None:
            return
        state = sharded_state(chunks, optimizer, scheduler, loading=False, with_optimizer=True, with_rng=False,
                              sharding=optimizer_sharding(self.sharding, final=False))
        sizes = staged_sizes(state, save_strategy())
        ranks_here, available = int(os.environ.get("LOCAL_WORLD_SIZE") or 1), available_memory()
        if room_for(sum(sizes), ranks_here, available):
            self.arena = StagingArena(sizes, self.device)
        elif dist.get_rank() == 0:
            log.warning(f"not preparing {human_size(sum(sizes))} of host memory per rank for async saves: "
                        f"{ranks_here} rank(s) here, {human_size(available or 0)} available; each save "
                        "stages as Megatron does (the first one pins its memory while training waits)")

    def save(self, step: int, chunks: list[Any], optimizer: Any, scheduler: Any, final: bool = False) -> None:
        """Write checkpoint `step` into its temporary directory; it completes at poll()/finish().
        final: the run's last save (not a stop signal's), the one `auto` sharding makes portable."""
        started = time.perf_counter()
        self.finish()
        stage = self.arena.stage if self.arena is not None and self.arena.wait() else None
        waited = time.perf_counter() - started
        target, tmp = step_dir(self.root, step), self.root / f".tmp_iter_{step:07d}"
        self._prepare(step, tmp)
        # optimizer None: a weights-only checkpoint (what `convert hf-to-mcore` writes): no optimizer and no
        # RNG state, and a layout that never equals a run's, so checkpoint._load never asks it for RNG state.
        weights_only = optimizer is None
        sharding = optimizer_sharding(self.sharding, final)
        building = time.perf_counter()
        state = sharded_state(chunks, optimizer, scheduler, loading=False, with_optimizer=not weights_only,
                              with_rng=not weights_only, sharding=sharding)
        saved_layout = {**layout(), "source": "weights"} if weights_only else layout()
        meta = {"step": step, "fingerprint": self.fingerprint, "layout": saved_layout,
                "optimizer_sharding": sharding, **self.model}
        state["recipec"] = {"step": step, "fingerprint": self.fingerprint, "layout": meta["layout"]}
        error: BaseException | None = None
        write_s = 0.0
        background: BackgroundWrite | None = None
        parts: dict[str, float] = {}  # where the pause went, for the log line
        arena_note = ""  # the first save says how the staging arena fared
        try:
            from megatron.core import dist_checkpointing

            writing = time.perf_counter()
            with protected_writers(ResultBox() if self.async_save else None):
                request = dist_checkpointing.save(state, str(tmp), sharded_strategy=save_strategy(),
                                                  async_sharded_save=self.async_save, **_async_strategy())
                staged = time.perf_counter()
                if request is not None:
                    background = BackgroundWrite(request, tmp, stage)
                    arena_note = self._arena_line(background.staged_sizes, sharding)
            write_s = time.perf_counter() - writing
            parts = {"waiting for the previous save": waited, "preparing": building - started - waited,
                     "building the state dict": writing - building,
                     "Megatron's plan and staging to host memory": staged - writing,
                     "starting the writer": time.perf_counter() - staged}
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException; agreed below
            error = exc
        self._agree(error, tmp, step)
        hasher = None
        if background is None:
            world, rank = dist.get_world_size(), dist.get_rank()
            hasher = manifest.Hasher(tmp, [n for n in manifest.listing(tmp) if manifest.owner(n, world) == rank])
            hasher.start()
        stall = time.perf_counter() - started
        self.pending = _Pending(step, tmp, target, hasher, meta, stall_s=stall, write_s=0.0 if background else write_s,
                                background=background)
        if background is not None and dist.get_rank() == 0:
            breakdown = ", ".join(f"{name} {secs * 1000:.0f} ms" for name, secs in parts.items() if secs >= 0.0005)
            log.info(f"saving checkpoint step {step} in the background to {tmp}: training paused "
                     f"{stall * 1000:.0f} ms ({breakdown}){arena_note}")

    def _arena_line(self, staged: list[int], sharding: str) -> str:
        """Once, at the first async save after reserve_staging(): how much of what it staged found its
        slice in the arena (the tail of rank 0's log line; a mismatch warns on any rank)."""
        a = self.arena
        if a is None or self._arena_reported or sharding != optimizer_sharding(self.sharding, final=False):
            return ""  # a final save stages another format: nothing to compare
        self._arena_reported = True
        covered = matches(a.sizes, staged) if a.region is not None else 0
        unused = len(a.sizes) - covered
        kind = "pinned" if a.pinned else "unpinned (no GPU)" if not a.register else "UNPINNED"
        what = f"{human_size(a.nbytes)} of {kind} host memory prepared ahead in {a.seconds:.1f} s"
        tally = f"covering {covered} of {len(staged)} staged tensors, {unused} unused"
        if covered < len(staged) or unused or a.error is not None:
            failed = f", failed: {a.error}" if a.error is not None else ""
            log.warning(f"rank {dist.get_rank()}: the host memory for async saves ({what}{failed}) did not match "
                        f"the save: {tally}; the rest was staged as Megatron stages it")
        return f"; staged into {what}, {tally}"

    def poll(self) -> Path | None:
        """Complete the pending checkpoint if every rank has hashed its files (one small all-reduce)."""
        if self.pending is None:
            return None
        busy = torch.tensor([1.0 if self.pending.busy() else 0.0], device=self.device)
        dist.all_reduce(busy)
        return None if busy.item() > 0 else self.finish()

    def finish(self) -> Path | None:
        """Wait for the hashes, write the manifest, rename into place, prune; the completed path."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        files: dict[str, Any] = {}
        error: BaseException | None = None
        timing = (0.0, 0.0)  # (background write, hashing) seconds on this rank
        try:
            if p.background is not None:
                report = p.background.wait()
                if report.error:
                    raise CheckpointSaveError(f"the background write of checkpoint step {p.step} failed: {report.error}")
                files, timing = report.files, (report.write_s, report.hash_s)
            else:
                assert p.hasher is not None
                files = p.hasher.result()
                timing = (0.0, p.hasher.seconds)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - agreed below
            error = exc
        self._agree(error, p.tmp, p.step)
        if p.background is not None:  # Megatron's finalize: collective, agrees on write failures itself
            try:
                p.background.finalize()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException; agreed below
                error = exc
            self._agree(error, p.tmp, p.step)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (files, timing))
        error, size = None, 0
        if dist.get_rank() == 0:
            try:
                size = self._complete(p, {k: v for part, _ in gathered for k, v in part.items()})
            except OSError as exc:
                error = exc
        self._agree(error, p.tmp, p.step)
        if dist.get_rank() == 0:
            self._after_complete(p.step)
            write_s, hash_s = (max(t[i] for _, t in gathered) for i in (0, 1))
            log.info(_saved_line(p, size, hash_s) if p.background is None else _async_saved_line(p, size, write_s, hash_s))
        dist.barrier()
        return p.final

    def _complete(self, p: _Pending, files: dict[str, Any]) -> int:
        """Write the manifest and rename the checkpoint into place; its size in bytes."""
        for name in manifest.listing(p.tmp):  # anything no rank claimed (none expected): hash it here
            if name not in files:
                files[name] = manifest.hash_file(p.tmp / name, fsync=True)
        manifest.write_manifest(p.tmp, p.meta, files)
        if p.final.exists():
            shutil.rmtree(p.final)
        os.replace(p.tmp, p.final)
        manifest.fsync_dir(self.root)
        return manifest.size_of(files)

    def _after_complete(self, step: int) -> None:
        """`latest` and pruning: the checkpoint is already complete, so a failure here only warns."""
        try:
            manifest.write_durably(self.root / LATEST, f"{step}\n")
            if self.pruner is not None:
                self.pruner.prune(newest_verified=step)  # renamed away now, deleted in the background
        except OSError as exc:
            log.warning(f"checkpoint {step_dir(self.root, step)} is complete, but updating {LATEST} or pruning "
                        f"failed: {exc}")

    def _prepare(self, step: int, tmp: Path) -> None:
        """Rank 0 makes the temporary directory, unless the save cannot fit (less free space than
        the newest checkpoint took) or the directory cannot be made; every rank learns which."""
        message: list[str | None] = [None]
        if dist.get_rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                steps = sorted(complete_steps(self.root))
                need = manifest.total_bytes(step_dir(self.root, steps[-1])) if steps else None
                free = free_bytes(self.root)
                if need and free < need and self.pruner is not None and self.pruner.reclaiming():
                    self.pruner.wait()  # short of space while pruned checkpoints are being deleted
                    free = free_bytes(self.root)
                if need and free < need:
                    message[0] = "full:" + full_message(self.root, step, free, need, removed=None)
                else:
                    # No save is pending and the run lock keeps other runs out: any .tmp_iter_* or
                    # .pruning_iter_* is left over from a run that died mid-save or mid-prune.
                    remove_leftovers(self.root)
                    tmp.mkdir()
            except OSError as exc:
                message[0] = (f"io:cannot write checkpoints under {self.root}: {os.strerror(exc.errno or 0)} "
                              f"({exc.filename or self.root})")
        _broadcast(message)
        if message[0]:
            kind, text = message[0].split(":", 1)
            raise (DiskFullError if kind == "full" else CheckpointSaveError)(text)

    def _agree(self, error: BaseException | None, tmp: Path, step: int) -> None:
        """All ranks learn whether any rank failed; then all raise (rank 0's verdict) and tmp is removed."""
        flags = torch.tensor([1.0 if error is not None else 0.0, 1.0 if says_disk_full(error) else 0.0],
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, full = flags.tolist()
        if not failed:
            return
        verdict: list[str | None] = [None]
        if dist.get_rank() == 0:
            full = full or probe_full(tmp if tmp.is_dir() else self.root)
            steps = sorted(complete_steps(self.root))
            need = manifest.total_bytes(step_dir(self.root, steps[-1])) if steps else None
            free = free_bytes(self.root) + tree_bytes(tmp)
            full = full or bool(need and free < need)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                verdict[0] = "full:" + full_message(self.root, step, free_bytes(self.root), need, removed=tmp)
            elif (cause := os_error(error)) is not None:
                verdict[0] = (f"io:could not write checkpoint step {step} under {self.root}: "
                              f"{os.strerror(cause.errno or 0)} ({cause.filename or tmp}); removed the "
                              f"partial {tmp.name}, earlier checkpoints are untouched")
        _broadcast(verdict)
        if verdict[0]:
            kind, text = verdict[0].split(":", 1)
            raise (DiskFullError if kind == "full" else CheckpointSaveError)(text) from error
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint save of step {step} failed on another rank (its log has the cause); "
                           "earlier checkpoints are untouched")


def _saved_line(p: _Pending, size: int, hashed_s: float) -> str:
    """The save's log line: `saved checkpoint .../iter_0000010 (13.0 MiB, written at 110.2 MiB/s) in
    0.12 s (+0.02 s hashing in the background)`.

    "in" is how long training paused for the save (the write, and waiting for an earlier save's
    hashes if they were not done); the hashing and fsync that complete it ran on the slowest rank
    for the "+" time while training went on."""
    rate = f", written at {human_size(size / p.write_s)}/s" if p.write_s > 0 else ""
    return (f"saved checkpoint {p.final} ({human_size(size)}{rate}) in {p.stall_s:.2f} s "
            f"(+{hashed_s:.2f} s hashing in the background)")


def _async_saved_line(p: _Pending, size: int, write_s: float, hash_s: float) -> str:
    """An async save's completion: `saved checkpoint .../iter_0000010 (13.0 MiB, written in the
    background at 110.2 MiB/s in 0.12 s, +0.02 s hashing); training paused 35 ms for it`.

    The rate and times are the slowest rank's; "paused" is save()'s stall (planning, common.pt,
    staging to host memory, the fork), logged also when the save started."""
    rate = f" at {human_size(size / write_s)}/s" if write_s > 0 else ""
    return (f"saved checkpoint {p.final} ({human_size(size)}, written in the background{rate} in {write_s:.2f} s, "
            f"+{hash_s:.2f} s hashing); training paused {p.stall_s * 1000:.0f} ms for it")


def _broadcast(box: list[Any]) -> None:
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)


def optimizer_sharding(setting: str, final: bool) -> str:
    """checkpoint.optimizer_sharding for one save. `auto`: periodic and stop-signal saves are
    dp_reshardable (each rank writes its flat shard: no gather, no stall beyond the write or the
    staging), the run's final save fully_reshardable (its optimizer state resumes under any layout).
    The manifest records the one used, and the load reads it from there."""
    if setting != "auto":
        return setting
    return "fully_reshardable" if final else "dp_reshardable"


def _async_strategy() -> dict[str, str]:
    """Megatron-Core 0.19 defaults its async save to NVRx (nvidia-resiliency-ext), which recipec does not
    install; its own `mcore` strategy is what 0.16 always used. Older versions have no such argument."""
    import inspect

    from megatron.core import dist_checkpointing

    return {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}
