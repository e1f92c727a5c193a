"""Datasets through Megatron-Core's builder, and the per-step batches of this rank.

mock -> MockGPTDataset; indexed -> GPTDataset over a blend of .bin/.idx
prefixes; text -> text files packed into indexed datasets first (corpus.py). sft data (jsonl
prompt/response records, sft.py) is built by its training mode (runtime/modes/sft.py), which
uses `run_sizes` and `step_microbatches` from here.
Batches are addressed by step, so the data position in a checkpoint is just
the step: resuming at step k reads exactly the samples an uninterrupted run
would have read.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
)
from recipec.compiler.errors import Problem, RecipeError
from recipec.compiler.plan import batch_layout
from recipec.compiler.schema import RecipeConfig

from .corpus import BUILTIN, pack

Batch = dict[str, Any]


def run_sizes(c: RecipeConfig) -> list[int]:
    """Samples the run draws from the train, valid and test splits."""
    t = c.train
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 0
    return [t.train_iters * t.global_batch_size, max(evals, 1) * t.eval_iters * t.global_batch_size, 0]


def build_datasets(c: RecipeConfig, tokenizer: Any, cache_dir: Path) -> tuple[Any, Any]:
    """(train, valid) datasets of mock, indexed or text data, sized for the whole run."""
    d, t = c.data, c.train
    sizes = run_sizes(c)
    prefixes: list[str] | None = None
    if d.kind == "text":
        _require([p for p in d.paths if p != BUILTIN and not Path(p).is_file()], "text file")
        prefixes = [pack(p, tokenizer, cache_dir) for p in d.paths]
    elif d.kind == "indexed":
        _require([p for p in d.paths if not (Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file())],
                 "indexed dataset (PREFIX.bin + PREFIX.idx)")
        prefixes = list(d.paths)
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=c.model.seq_length,
        blend=(prefixes, list(d.weights) or None) if prefixes else None,
        split=d.split,
        path_to_cache=str(Path(d.cache_dir) if d.cache_dir else cache_dir / "index_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if prefixes:
        shown = list(d.paths) if d.kind == "text" else prefixes  # name the user's files, not the packs
        _check_splits(prefixes, shown, config.split_matrix, sizes, d.split)
    cls = GPTDataset if prefixes else MockGPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train, valid


def _require(missing: list[str], what: str) -> None:
    """A missing data file is the user's to fix: say which, not a traceback from deep in Megatron."""
    if missing:
        raise RecipeError([Problem(RecipeError, f"no {what} at {', '.join(map(repr, missing))}", key="data.paths",
                                   hint="paths are relative to the directory the run starts in")])


def _check_splits(prefixes: list[str], shown: list[str], matrix: list[tuple[float, float] | None] | None,
                  sizes: list[int], split: str) -> None:
    """Every split the run draws from gets at least one sequence of every prefix.

    Megatron-Core splits each dataset by sequence index (round(begin * n) .. round(end * n)); a
    split that is asked for samples but has no sequences makes its epoch count loop forever
    (GPTDataset._get_num_epochs), so a corpus too small for data.split would hang the run.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix, name_shown in zip(prefixes, shown):
        try:
            n = int(IndexedDataset(prefix).sequence_lengths.shape[0])
        except Exception as exc:  # noqa: BLE001 - a damaged .idx fails in many ways; all are the file's
            raise RecipeError([Problem(RecipeError, f"{prefix}.idx is not a readable Megatron indexed dataset "
                                       f"({type(exc).__name__}: {exc})", key="data.paths",
                                       hint="rebuild it with Megatron's preprocess_data.py, or use data.kind "
                                            "= \"text\"")]) from None
        for (name, size), bounds in zip(zip(("train", "valid", "test"), sizes), matrix or []):
            if bounds is None or not size:
                continue
            count = round(bounds[1] * n) - round(bounds[0] * n)
            if count < 1:
                raise RecipeError([Problem(
                    RecipeError, f"{name_shown} has {n} sequence(s), and data.split={split!r} leaves the {name} split "
                    f"none of them", key="data.split",
                    hint=f"add text (blank lines separate documents; the {name} split needs about "
                         f"{math.ceil(1 / max(bounds[1] - bounds[0], 1e-9))} of them), or give the {name} split "
                         "more weight in data.split")])


def _collate(samples: list[Batch]) -> Batch:
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


def step_microbatches(dataset: Any, step: int, c: RecipeConfig, device: torch.device,
                      collate: Callable[[list[Any]], Batch] | None = None) -> list[Batch]:
    """This data-parallel rank's microbatches of global batch number `step` (`collate` makes one
    microbatch of its samples; a mode with its own batch layout passes its own). Which samples: the
    compiler's one batch split (compiler/plan.batch_layout), the same that made the plan."""
    layout = batch_layout(c)
    if parallel_state.get_data_parallel_world_size() != layout.data_parallel_size:
        raise RuntimeError(f"data-parallel size {parallel_state.get_data_parallel_world_size()} is not the plan's "
                           f"{layout.data_parallel_size}; the process groups do not match the compiled layout")
    mbs, n = c.train.micro_batch_size, len(dataset)
    indices = [i % n for i in layout.rank_samples(step, parallel_state.get_data_parallel_rank())]
    batches = []
    for i in range(0, len(indices), mbs):
        batch = (collate or _collate)([dataset[j] for j in indices[i:i + mbs]])
        batch = _this_cp_rank(batch)
        batches.append({k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()})
    return batches


def _this_cp_rank(batch: Batch) -> Batch:
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return _cp_split()(batch)


@functools.cache
def _cp_split() -> Callable[[Batch], Batch]:
    """Megatron's split of a batch into this context-parallel rank's two sequence chunks.
    Megatron-Core 0.19 added a required `is_hybrid_cp` (hybrid CP is its dynamic-length scheme);
    without it every CP run failed on its first batch (2 H200s, session 6)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return functools.partial(get_batch_on_this_cp_rank, is_hybrid_cp=False)
    return get_batch_on_this_cp_rank


def microbatch_iterator(batches: list[Batch]) -> Iterator[Batch]:
    return iter(batches)
