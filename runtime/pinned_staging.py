"""Host memory for async saves, pinned while training runs instead of during the first save.

An async save copies every tensor this rank writes to pinned host memory, and training waits for
that copy. The copy is fast (16 GiB in ~0.3 s on an H200); the first save was not: PyTorch's
caching host allocator (Megatron's `preload_tensors`: `tensor.to("cpu", non_blocking=True)`) had
to cudaHostAlloc all 16 GiB, 8.0 s for the llama32_1b state. Registering malloc'd memory instead
(PYTORCH_CUDA_ALLOC_CONF pinned_use_cuda_host_register) took 8.7 s, and 6.0 s again on the second
save; reserving cudaHostAlloc blocks in a thread during training made the save pause 0.39 s but
stretched the step beside it by 8.8 s (session 7, bench/RESULTS.md).

So recipec stages into its own arena (StagingArena): after the first step it computes the exact
tensor sizes the save will stage — from the same sharded state dict, prepared as
dist_checkpointing.save prepares it, and distributed over the data-parallel ranks as the save
strategy distributes it, so each rank holds its own share only — and a thread maps, touches and
registers one slice per tensor. The save copies into those slices instead of calling Megatron's
preload. `matches()` compares the arena with what a save then staged; the Saver logs that once,
so a drift (a Megatron version staging other tensors) shows in the log, and an unmatched tensor
is staged as Megatron would stage it.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import is_main_replica
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)


def staged_sizes(state: dict[str, Any], strategy: Any) -> list[int]:
    """Bytes of each tensor this rank will stage when saving `state` with `strategy`, prepared as
    dist_checkpointing.save prepares it (factories applied, non-persistent and common parts out)
    and distributed over data-parallel ranks as the strategy distributes it. `state` is used up."""
    sharded, _ = save_preprocess(state, validate_access_integrity=False)
    if isinstance(strategy, FullyParallelSaveStrategyWrapper):
        strategy.apply_saving_parallelization(sharded)  # collective over the data-parallel group
    return sorted(
        item.data.numel() * item.data.element_size()
        for item in nested_values(sharded)
        if isinstance(item, ShardedTensor) and item.data is not None and is_main_replica(item.replica_id)
    )


def bucket_sizes(buckets: Iterable[Any]) -> list[int]:
    """Bytes of each tensor in Megatron's write buckets `(file, key, (bytes_data, tensor_data))`."""
    return sorted(tensor.numel() * tensor.element_size() for _, _, (_, tensors) in buckets for _, tensor in tensors)


def room_for(per_rank: int, ranks_here: int, available: int | None) -> bool:
    """Whether this node's ranks can each hold `per_rank` bytes of staging memory within 80% of the
    memory the kernel reports available (None: unknown, assume so). Touching more than there is
    would bring the OOM killer mid-run; declining leaves the first save to pin its memory, which
    fails with an error instead."""
    return available is None or per_rank * max(ranks_here, 1) <= 0.8 * available


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def matches(reserved: list[int], staged: list[int]) -> int:
    """How many of the staged tensors had a reserved size (each reserved size used once)."""
    return sum((Counter(reserved) & Counter(staged)).values())


_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


class StagingArena:
    """Host memory for the tensors an async save stages: one shared anonymous mapping with a slice
    per tensor size, touched and (on GPU) pinned with cudaHostRegister in a thread, once.

    Why not PyTorch's pinned allocator: cudaHostAlloc pinned 2.1 GiB/s and held up the training
    stream while it did (3.1 s of an 8 GiB pin beside a matmul loop); touching pages and
    registering them ran at 11 GiB/s and cost that loop 0.4 s (bench/pinned_alloc_bench.py, H200).
    Why shared: the writer is a forked process (ckpt_workers.BackgroundWrite); a shared mapping
    reaches it as is, where private pinned pages would be copied at fork (Linux copies pages
    pinned for DMA instead of sharing them copy-on-write). The parent writes the arena only when
    staging, and a save stages only after the previous writer has finished.
    Each staged tensor gets a storage of its own (torch.frombuffer over its slice): the writer
    torch.save()s each one, and a view of one big storage would write all of it."""

    ALIGN = 4096

    def __init__(self, sizes: list[int], device: torch.device) -> None:
        """device: this rank's; on a GPU the arena is registered (pinned) from its context."""
        self.sizes, self.device, self.register = sizes, device, device.type == "cuda"
        self.offsets: list[tuple[int, int]] = []  # (size, offset) per slice
        total = 0
        for size in sizes:
            self.offsets.append((size, total))
            total += -(-max(size, 1) // self.ALIGN) * self.ALIGN
        self.total = total
        self.region: mmap.mmap | None = None
        self.pinned = False
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if sizes:
            self._thread = threading.Thread(target=self._prepare, name="recipec-staging-arena", daemon=True)
            self._thread.start()

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def _prepare(self) -> None:
        started = time.perf_counter()
        try:
            region = mmap.mmap(-1, self.total, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            torch.frombuffer(region, dtype=torch.uint8).zero_()  # fault every page in now, not during a save
            if self.register:
                torch.cuda.set_device(self.device)  # this thread's context: the rank's GPU, not GPU 0
                base = torch.frombuffer(region, dtype=torch.uint8).data_ptr()
                err = torch.cuda.cudart().cudaHostRegister(base, self.total, _REGISTER_PORTABLE)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister of {self.total} bytes failed: {err}")
                self.pinned = True
            self.region = region
        except (OSError, RuntimeError, MemoryError) as exc:  # the saves stage as Megatron does
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - started

    def wait(self) -> bool:
        """Until the arena is ready (before a save and before it forks a writer); whether it is usable."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.region is not None

    def stage(self, buckets: list[Any]) -> list[Any]:
        """Megatron's write buckets with every tensor copied into a slice of its size (a tensor with
        no free slice of its size: copied as Megatron's preload_tensors does); waits for the copies.

        On a GPU, host tensors pass through as they are: they are staged copies already (the final
        save's gathered optimizer state), and copying them again only lengthened that save's pause
        (1.9 s against 0.4-0.6 s, session 7). In CPU mode the parameters themselves are host
        tensors and are copied like a GPU's, so the writer never reads live training state."""
        assert self.region is not None
        free: dict[int, list[int]] = {}
        for size, offset in self.offsets:
            free.setdefault(size, []).append(offset)
        staged, on_gpu = [], False
        for file_name, storage_key, (bytes_data, tensors) in buckets:
            out = []
            for item, tensor in tensors:
                size = tensor.numel() * tensor.element_size()
                on_gpu = on_gpu or tensor.is_cuda
                if size and free.get(size) and (tensor.is_cuda or not self.register):
                    host = torch.frombuffer(self.region, dtype=torch.uint8, count=size, offset=free[size].pop())
                    host = host.view(tensor.dtype).view(tensor.shape)
                    host.copy_(tensor, non_blocking=True)
                else:  # Megatron's preload: pinned by PyTorch's allocator on GPU, as is on the host
                    host = tensor.to("cpu", non_blocking=tensor.is_cuda)
                out.append((item, host))
            staged.append((file_name, storage_key, (bytes_data, out)))
        if on_gpu:
            torch.cuda.synchronize()
        return staged
