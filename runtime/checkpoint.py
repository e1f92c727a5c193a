"""Resuming from Megatron-Core dist checkpoints (torch_dist) that never lie.

The save side (atomic, hashed, fsynced, pruned) is ckpt_save.Saver; the layout of a checkpoint
root is described there. On resume the newest `iter_N/` is used only if every file matches its
manifest entry (size and SHA-256; the ranks share the reading) and the load itself succeeds on
every rank. Anything else (a missing manifest, a truncated file, a block corrupted in place, a
load failure of any kind, including torch DCP's CheckpointException, which is a BaseException)
is reported, the directory is renamed `iter_N.bad` in the run's own checkpoint directory (so a
relaunch does not retry it and pruning does not count it), and the previous one is tried. Only
KeyboardInterrupt and SystemExit pass through. Every decision is one all-gather of the ranks'
verdicts, so a failure on one rank's shard cannot leave the ranks divergent or waiting.

Two failures are not damage and never mark anything bad: a checkpoint of another model (found
from the manifest's model record before anything is read, or from Megatron's shape and key
mismatch errors for older manifests; ckpt_compat) and one saved under a layout its optimizer
state cannot be resharded from. Both stop the run (exit 2) and leave the checkpoints as they are.
Loads log what they read and how long verifying and loading took; the LR schedule a resumed run
follows is the saved one (ckpt_state.restore_schedule) and is logged too. Under data parallelism
the load is fully parallel (ckpt_state.load_strategy): each DP rank reads its share of the tensors
and the ranks exchange the rest; a failed read is every rank's failure (torch DCP gathers it), so
the fallback above still holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from recipec.compiler.errors import RecipeError

from . import ckpt_compat as compat
from . import ckpt_manifest as manifest
from .adam_state import prime_optimizer_state_for_load
from .ckpt_compat import ModelChangeError
from .ckpt_manifest import MANIFEST, verify
from .ckpt_prune import complete_steps, prune, step_dir
from .ckpt_save import (
    LATEST,
    CheckpointSaveError,
    DiskFullError,
    Saver,
)
from .ckpt_state import (
    PeerLoadError,
    layout,
    load_strategy,
    restore_rng,
    restore_schedule,
    sharded_state,
)
from .logs import size as human_size

__all__ = ["LATEST", "MANIFEST", "CheckpointSaveError", "CheckpointUnusableError", "DiskFullError",
           "LayoutChangeError", "ModelChangeError", "Saver", "bad_checkpoints", "candidates", "complete_steps",
           "has_checkpoints", "load_latest", "prune", "refuse_model_change", "step_dir", "verify"]

log = logging.getLogger("recipec.runtime")
BAD_SUFFIX = ".bad"
BAD_NOTE = "RECIPEC_BAD.txt"


class LayoutChangeError(RecipeError):
    """A good checkpoint that cannot be resumed under this layout: stop, never fall back past it."""


class CheckpointUnusableError(RecipeError):
    """Checkpoints exist but none loads: stop rather than silently train from scratch."""


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories, newest first (including incomplete ones, to report them)."""
    steps = [p for p in root.glob("iter_*") if p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def bad_checkpoints(root: Path) -> list[Path]:
    """Directories marked bad by an earlier resume (`iter_N.bad`, `iter_N.bad2`, ...)."""
    return sorted(p for p in root.glob(f"iter_*{BAD_SUFFIX}*") if p.is_dir())


def has_checkpoints(root: Path) -> bool:
    return root.is_dir() and bool(candidates(root) or bad_checkpoints(root))


def _mark_bad(directory: Path, problem: str) -> Path | None:
    """Rename a failed checkpoint out of the candidates, with the reason inside; None if impossible."""
    for n in range(1, 100):
        target = directory.with_name(directory.name + BAD_SUFFIX + ("" if n == 1 else str(n)))
        if not target.exists():
            break
    try:
        directory.rename(target)
        (target / BAD_NOTE).write_text(f"{problem}\n")
        manifest.fsync_dir(directory.parent)
    except OSError as exc:
        log.warning(f"could not mark {directory} as bad ({exc}); it will be tried again next time")
        return None
    return target


def _describe(exc: BaseException) -> str:
    """One line for any load failure; CheckpointException hides its ranks' causes in `.failures`."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:  # its str() is a traceback; the causes are the news
        _, value = next(iter(failures.items()))
        cause = value[0] if isinstance(value, tuple) and value else value
        text = f"{type(exc).__name__} on rank(s) {sorted(failures)}: {type(cause).__name__}: {cause}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:600]


def _agree(local: str | None) -> str | None:
    """The first rank's problem, known to every rank (one all-gather), or None if no rank has one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return next(((f"rank {r}: {p}" if r else p) for r, p in enumerate(everyone) if p is not None), None)


def _verify_shared(directory: Path) -> str | None:
    """Sizes and hashes of every file, each rank reading its share; collective."""
    meta, problem = manifest.read_manifest(directory)
    if meta is not None:
        world, rank = dist.get_world_size(), dist.get_rank()
        try:
            files = meta["files"]
            problem = manifest.check_files(directory, files, hashes=False) if rank == 0 else None
            mine = [n for n in sorted(files) if manifest.owner(n, world) == rank]
            problem = problem or manifest.check_files(directory, files, mine)
        except OSError as exc:
            problem = f"unreadable ({exc})"
    return _agree(problem)


def _check_model(directory: Path, model: dict[str, Any] | None, source: str) -> None:
    """Raise ModelChangeError (on every rank) if `directory`'s manifest records another model's shapes."""
    local = None
    meta, _ = manifest.read_manifest(directory)
    if meta is not None and model:
        structure, _ = compat.differences(meta, model)
        if structure:
            local = str(compat.refusal(directory, source, structure))
    problem = _agree(local)
    if problem is not None:
        raise ModelChangeError(problem)


def refuse_model_change(root: Path, model: dict[str, Any], source: str) -> None:
    """Before any model is built: stop if the checkpoint a resume would start with holds another model.

    Collective. Looks at the newest directory with a manifest; load_latest checks each one it tries."""
    for directory in candidates(root):
        if (directory / MANIFEST).is_file():
            _check_model(directory, model, source)
            return


def load_latest(root: Path, chunks: list[Any], optimizer: Any, scheduler: Any, fingerprint: str,
                *, with_optimizer: bool = True, require: bool = False, mark_bad: bool = False,
                model: dict[str, Any] | None = None, source: str = "checkpoint.load",
                override_schedule: bool = False) -> int:
    """Load the newest good checkpoint under `root`; the step to continue from (0 if none).

    mark_bad: rename failed ones to `iter_N.bad` (the run's own checkpoint directory only: a
    directory another run or user owns is reported on, never changed).
    model: this run's ckpt_compat.model_record; a checkpoint of another model is refused by name.
    source: the config key that names `root` (for the messages).
    override_schedule: keep this recipe's LR schedule instead of the saved one.
    """
    tried: list[str] = []
    rank0 = dist.get_rank() == 0
    marked_before = bad_checkpoints(root)
    for directory in candidates(root):
        _check_model(directory, model, source)
        meta, _ = manifest.read_manifest(directory)
        if rank0 and meta is not None:
            log.info(f"verifying {directory} ({len(meta['files'])} files, "
                     f"{human_size(manifest.size_of(meta['files']))}) before loading it")
        started = time.perf_counter()
        problem = _verify_shared(directory)
        if problem is None:
            load = _Load(directory, meta or {}, source, model, with_optimizer, override_schedule,
                         time.perf_counter() - started)
            step, problem = _try_load(load, chunks, optimizer, scheduler, fingerprint)
            if step is not None:
                return step
        moved = None
        if mark_bad and rank0:
            moved = _mark_bad(directory, problem)
        if rank0:
            where = f"; moved to {moved.name}" if moved else ""
            log.warning(f"checkpoint {directory} is unusable: {problem}{where}; trying the previous one")
        tried.append(f"{directory.name}: {problem}")
        dist.barrier()
    if tried or marked_before:
        # A failed load may have written into the model; starting over would also bury the run.
        earlier = [f"{p.name} (marked bad earlier: {_bad_reason(p)})" for p in marked_before]
        raise CheckpointUnusableError(
            f"no usable checkpoint under {root} ({'; '.join(tried + earlier)}); move the directory away to start "
            "a fresh run, or point checkpoint.load at a good one")
    if require:
        raise CheckpointUnusableError(f"no checkpoint under {root} (expected iter_*/ directories from recipec "
                                      "or `recipec convert hf-to-mcore`, or a Hugging Face directory)")
    return 0


def _bad_reason(directory: Path) -> str:
    try:
        return (directory / BAD_NOTE).read_text().strip()[:300] or "no reason recorded"
    except OSError:
        return "no reason recorded"


@dataclass(frozen=True)
class _Load:
    """One load attempt: where, for which config key and model, and how long verifying took."""

    directory: Path
    meta: dict[str, Any]  # read before any collective: rank 0 may rename a failed directory right after
    source: str
    model: dict[str, Any] | None
    with_optimizer: bool
    override_schedule: bool
    verified_s: float


def _try_load(load: _Load, chunks: list[Any], optimizer: Any, scheduler: Any,
              fingerprint: str) -> tuple[int | None, str]:
    """(step, "") when every rank loaded the directory, else (None, the first rank's failure).

    A shape or key mismatch stops the run (ModelChangeError) instead of counting as damage: the
    files verified intact, so the tensors belong to another model."""
    local: str | None = None
    step: int | None = None
    schedule = ""
    started = time.perf_counter()
    peer: str | None = None  # this rank read its share; another rank's failure is the news
    try:
        step, schedule = _load(load, chunks, optimizer, scheduler)
    except LayoutChangeError as exc:
        local = f"layout:{exc}"
    except PeerLoadError as exc:
        peer = str(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure (CheckpointException is a BaseException)
        local = _describe(exc)
    loaded_s = time.perf_counter() - started
    problem = _agree(local) or peer
    meta = load.meta
    if problem is not None:
        if "layout:" in problem:
            raise LayoutChangeError(problem.split("layout:", 1)[1])
        if compat.is_model_mismatch(problem):
            raise compat.mismatch_refusal(load.directory, load.source, problem, recorded="model" in meta)
        return None, problem
    if dist.get_rank() == 0:
        note = "" if meta.get("fingerprint") == fingerprint else " (saved by a different compiled recipe)"
        size = manifest.size_of(meta["files"])
        log.info(f"resumed from {load.directory} at step {step}{note}: verified {len(meta['files'])} files "
                 f"({human_size(size)}) in {load.verified_s:.2f} s, loaded in {loaded_s:.2f} s "
                 f"({human_size(size / max(loaded_s, 1e-9))}/s)")
        _, math = compat.differences(meta, load.model or {})
        if math and load.source != "checkpoint.pretrained":  # a fine-tune from weights changes them on purpose
            log.warning(compat.warning(load.directory, math))
        if schedule:
            log.info(schedule)
    return step, ""


def _load(load: _Load, chunks: list[Any], optimizer: Any, scheduler: Any) -> tuple[int, str]:
    """(the saved step, the LR schedule line for the log, or "" without optimizer state)."""
    from megatron.core import dist_checkpointing

    directory, with_optimizer, meta = load.directory, load.with_optimizer, load.meta
    now = layout()
    saved = meta.get("layout", {})
    same_layout = saved == now
    sharding = meta.get("optimizer_sharding", "fully_reshardable")
    if with_optimizer and sharding == "dp_reshardable" and (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
        raise LayoutChangeError(
            f"{directory} holds dp_reshardable optimizer state saved under TP {saved.get('tp')} x PP "
            f"{saved.get('pp')}; it resumes only under that layout (now TP {now['tp']} x PP {now['pp']}). "
            "Resume with the saved layout, resume from the run's final checkpoint (with the default "
            "optimizer_sharding 'auto' it is fully_reshardable), or start from its weights with "
            "checkpoint.pretrained; checkpoint.optimizer_sharding=\"fully_reshardable\" makes every save portable")
    if with_optimizer:
        prime_optimizer_state_for_load(optimizer)
    with torch.no_grad():
        state = sharded_state(chunks, optimizer, scheduler, loading=True, with_optimizer=with_optimizer,
                              with_rng=same_layout, sharding=sharding)
        strategy = load_strategy(str(directory))
        loaded = dist_checkpointing.load(state, str(directory), sharded_strategy=strategy)
    if strategy is not None and strategy.shares and dist.get_rank() == 0:
        total = sum(strategy.shares)
        split = ", ".join(f"{100 * n / max(total, 1):.0f}%" for n in strategy.shares)
        log.info(f"parallel load over {len(strategy.shares)} data-parallel ranks: each read its share of "
                 f"{human_size(total)} of tensors ({split})")
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
    schedule = ""
    if with_optimizer:
        with torch.no_grad():  # dp_reshardable copies into fp32 main params that are views of the model's leaves
            optimizer.load_state_dict(loaded["optimizer"])
        schedule = restore_schedule(scheduler, loaded["scheduler"], override=load.override_schedule)
    if same_layout and "rng_state" in loaded:
        restore_rng(loaded["rng_state"])
    return int(meta["step"]), schedule


def save(root: Path, step: int, chunks: list[Any], optimizer: Any, scheduler: Any, fingerprint: str,
         keep_last: int | None, sharding: str, device: torch.device | None = None,
         model: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` and complete it before returning (the training loop uses Saver).
    optimizer None: the weights only (hf-to-mcore); model: the manifest's model record (Saver)."""
    saver = Saver(root, fingerprint, keep_last, sharding, device or torch.device("cpu"), model=model)
    saver.save(step, chunks, optimizer, scheduler)
    final = saver.close()
    assert final is not None
    return final
