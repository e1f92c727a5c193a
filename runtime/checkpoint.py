"""Atomic, resumable Megatron-Core dist checkpoints (torch_dist).

Layout under `checkpoint.save`:

    iter_0000050/      a complete checkpoint (model, optimizer, scheduler, RNG, step,
                       fingerprint) with recipec_manifest.json listing every file's size
    latest             the newest complete step, rewritten last (atomic rename)

A checkpoint is written into `.tmp_iter_XXXXXXX/`, its manifest written after every
rank finished, and only then renamed into place; a crash or SIGTERM at any point
leaves the previous checkpoint untouched. On resume the newest directory whose
manifest matches the files on disk is used; a truncated or partial one is reported
and skipped, so nothing a user trained is lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from recipec.compiler.errors import RecipeError

from .device import prime_optimizer_state_for_load

log = logging.getLogger("recipec.runtime")
MANIFEST = "recipec_manifest.json"
LATEST = "latest"


class LayoutChangeError(RecipeError):
    """A good checkpoint that cannot be resumed under this layout: stop, never fall back past it."""


class CheckpointUnusableError(RecipeError):
    """Checkpoints exist but none loads: stop rather than silently train from scratch."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> ShardedObject:
    """This rank's RNG streams, sharded by (pp, tp) and replicated over DP (as Megatron-LM does)."""
    state = {
        "random": torch.random.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state", state, (parallel_state.get_pipeline_model_parallel_world_size(),
                             parallel_state.get_tensor_model_parallel_world_size()),
        (pp, tp), replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _state(chunks: list[Any], optimizer: Any, scheduler: Any, *, loading: bool, with_optimizer: bool,
           with_rng: bool, sharding: str) -> dict[str, Any]:
    # The unwrapped modules: DDP's state-dict keys carry a "module." prefix the model does not.
    chunks = [getattr(chunk, "module", chunk) for chunk in chunks]
    if len(chunks) == 1:
        model_sd = chunks[0].sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd}
    else:
        model_sd = {}
        state = {}
        for i, chunk in enumerate(chunks):
            sd = chunk.sharded_state_dict()
            state[f"model{i}"] = sd
            model_sd.update(sd)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": sharding})
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def save(root: Path, step: int, chunks: list[Any], optimizer: Any, scheduler: Any, fingerprint: str,
         keep_last: int | None, sharding: str) -> Path:
    """Write checkpoint `step` atomically, then point `latest` at it and prune old ones."""
    final, tmp = _step_dir(root, step), root / f".tmp_iter_{step:07d}"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _state(chunks, optimizer, scheduler, loading=False, with_optimizer=True, with_rng=True, sharding=sharding)
    state["recipec"] = {"step": step, "fingerprint": fingerprint, "layout": _layout()}
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank0:
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"step": step, "fingerprint": fingerprint, "layout": _layout(), "files": files,
                "optimizer_sharding": sharding}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = root / f".{LATEST}.tmp"
        marker.write_text(f"{step}\n")
        os.replace(marker, root / LATEST)
        _fsync_dir(root)
        if keep_last:
            for old in sorted(complete_steps(root))[:-keep_last]:
                shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_steps(root: Path) -> list[int]:
    return [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and (p / MANIFEST).exists()]


def verify(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None if it is."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return "no manifest (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, size in files.items():
        path = directory / name
        if not path.exists():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} is {path.stat().st_size} bytes, expected {size} (truncated)"
    return None


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories, newest first (including incomplete ones, to report them)."""
    steps = [p for p in root.glob("iter_*") if p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def load_latest(root: Path, chunks: list[Any], optimizer: Any, scheduler: Any, fingerprint: str,
                *, with_optimizer: bool = True, require: bool = False) -> int:
    """Load the newest good checkpoint under `root`; the step to continue from (0 if none)."""
    tried: list[str] = []
    for directory in candidates(root):
        problem = verify(directory)
        if problem is None:
            try:
                return _load(directory, chunks, optimizer, scheduler, fingerprint, with_optimizer)
            except LayoutChangeError:
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint must not end the run
                problem = f"{type(exc).__name__}: {exc}"
        if dist.get_rank() == 0:
            log.warning("checkpoint %s is unusable: %s; trying the previous one", directory, problem)
        tried.append(f"{directory.name}: {problem}")
    if tried:
        # A failed load may have written into the model; starting over would also bury the run.
        raise CheckpointUnusableError(
            f"no usable checkpoint under {root} ({'; '.join(tried)}); move the directory away to start "
            "a fresh run, or point checkpoint.load at a good one")
    if require:
        raise CheckpointUnusableError(f"no checkpoint under {root} (expected iter_*/ directories from recipec "
                                      "or `recipec convert hf-to-mcore`, or a Hugging Face directory)")
    return 0


def _load(directory: Path, chunks: list[Any], optimizer: Any, scheduler: Any, fingerprint: str,
          with_optimizer: bool) -> int:
    meta = json.loads((directory / MANIFEST).read_text())
    same_layout = meta.get("layout") == _layout()
    sharding = meta.get("optimizer_sharding", "fully_reshardable")
    saved, now = meta.get("layout", {}), _layout()
    if with_optimizer and sharding == "dp_reshardable" and (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
        raise LayoutChangeError(
            f"{directory} holds dp_reshardable optimizer state saved under TP {saved.get('tp')} x PP "
            f"{saved.get('pp')}; it resumes only under that layout (now TP {now['tp']} x PP {now['pp']}). "
            "Resume with the saved layout, or start from its weights with checkpoint.pretrained")
    if with_optimizer:
        prime_optimizer_state_for_load(optimizer)
    with torch.no_grad():
        state = _state(chunks, optimizer, scheduler, loading=True, with_optimizer=with_optimizer,
                       with_rng=same_layout, sharding=sharding)
        loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout and "rng_state" in loaded:
        rng = loaded["rng_state"]
        torch.random.set_rng_state(rng["random"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if dist.get_rank() == 0:
        note = "" if meta.get("fingerprint") == fingerprint else " (saved by a different compiled recipe)"
        log.info("resumed from %s at step %d%s", directory, meta["step"], note)
    return int(meta["step"])
