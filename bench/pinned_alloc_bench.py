"""How fast can an async save's staging memory be pinned, and what does pinning cost training?

The first async save of llama32_1b paused training 8.0 s (one H200), nearly all of it PyTorch's
caching host allocator pinning 16 GiB with cudaHostAlloc; reserving that memory in a thread during
training (runtime/pinned_staging.py) made the save pause 0.39 s but stretched the step it overlapped
by 8.8 s: the allocation serializes with the training stream. This bench times the ways to pin
GiB-sized buffers, each alone and beside a GPU matmul loop standing in for training:

    cudaHostAlloc      torch.empty(pin_memory=True) (what the caching allocator does)
    register 4K        pageable torch.empty, touched, then cudaHostRegister
    register THP       private mmap + madvise(MADV_HUGEPAGE), touched, then cudaHostRegister
    register shared    shared anonymous mmap, touched, then cudaHostRegister (StagingArena's way)

and, for each, whether a forked child (the checkpoint writer is one) reads what was copied in
and how long the fork takes (Linux copies private pages pinned for DMA at fork).

    python bench/pinned_alloc_bench.py [--gib 8] [--chunk-mib 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def pin_host_alloc(size: int) -> Any:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _register(buffer: torch.Tensor) -> torch.Tensor:
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return buffer


def pin_register_4k(size: int) -> Any:
    return _register(torch.empty(size, dtype=torch.uint8).zero_())


def pin_register_thp(size: int) -> Any:
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(region, dtype=torch.uint8).zero_()
    return (_register(buffer), region)


def pin_register_shared(size: int) -> Any:
    region = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(region, dtype=torch.uint8).zero_()
    return (_register(buffer), region)


def fork_reads(buffers: list[torch.Tensor], head: torch.Tensor, tail: torch.Tensor) -> tuple[bool, float]:
    """Whether a forked child sees `head` and `tail` at both ends of every buffer; the fork's time."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: no CUDA, only host memory
        ok = all(torch.equal(b[: head.numel()], head) and torch.equal(b[-tail.numel():], tail) for b in buffers)
        os._exit(0 if ok else 1)
    forked = time.perf_counter() - started
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, forked


def unpin(kind: str, handle: Any) -> None:
    if kind != "cudaHostAlloc":
        buffer = handle[0] if isinstance(handle, tuple) else handle
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def training_stand_in(stop: threading.Event, times: list[float]) -> None:
    """bf16 matmuls, synchronized every iteration, as a training step's kernels would be."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)


def run(kind: str, pin: Callable[[int], Any], total: int, chunk: int, beside_training: bool) -> dict[str, Any]:
    times: list[float] = []
    stop = threading.Event()
    if beside_training:
        baseline: list[float] = []
        probe = threading.Event()
        threading.Timer(2.0, probe.set).start()
        training_stand_in(probe, baseline)
        worker = threading.Thread(target=training_stand_in, args=(stop, times))
        worker.start()
        time.sleep(0.5)
    started = time.perf_counter()
    handles = [pin(chunk) for _ in range(total // chunk)]
    seconds = time.perf_counter() - started
    # D2H into the pinned buffers: does the pinning method change the copy rate?
    src = (torch.arange(chunk, device="cuda") % 251).to(torch.uint8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for h in handles:
        (h[0] if isinstance(h, tuple) else h).copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - t
    buffers = [h[0] if isinstance(h, tuple) else h for h in handles]
    fork_ok, fork_s = (None, None) if beside_training else fork_reads(buffers, src[:4096].cpu(), src[-4096:].cpu())
    row: dict[str, Any] = {"kind": kind, "beside_training": beside_training, "GiB": total / 2**30,
                           "pin_s": seconds, "pin_GiBps": total / 2**30 / seconds,
                           "d2h_GiBps": total / 2**30 / copy_s, "fork_child_reads": fork_ok, "fork_s": fork_s}
    if beside_training:
        stop.set()
        worker.join()
        base = sorted(baseline)[len(baseline) // 2]
        during = list(times)
        row["matmul_iter_s"] = base
        row["training_excess_s"] = sum(x - base for x in during)
        row["training_slowest_iter_s"] = max(during) if during else None
    for h in handles:
        unpin(kind, h)
    del handles
    torch._C._host_emptyCache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8)
    p.add_argument("--chunk-mib", type=int, default=1024)
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("pinned_alloc_bench: needs a GPU", file=sys.stderr)
        return 2
    thp_file = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp_file.read_text().strip() if thp_file.exists() else "unknown"
    print(f"transparent hugepages: {thp}", flush=True)
    chunk = args.chunk_mib * 2**20
    total = int(args.gib * 2**30) // chunk * chunk
    kinds = {"cudaHostAlloc": pin_host_alloc, "register 4K": pin_register_4k, "register THP": pin_register_thp,
             "register shared": pin_register_shared}
    rows = []
    for beside in (False, True):
        for kind, pin in kinds.items():
            try:
                rows.append(run(kind, pin, total, chunk, beside))
            except Exception as exc:  # noqa: BLE001 - a bench row: report and go on
                rows.append({"kind": kind, "beside_training": beside, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"thp": thp, "rows": rows}, f, indent=1)
    print("\n| pinning | beside training | GiB | pin (s) | GiB/s | D2H into it (GiB/s) | training excess (s) | "
          "forked child reads it | fork (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | {r['beside_training']} | failed: {r['error']} | | | | | | |")
            continue
        excess = f"{r['training_excess_s']:.2f}" if "training_excess_s" in r else "—"
        print(f"| {r['kind']} | {'yes' if r['beside_training'] else 'no'} | {r['GiB']:.0f} | {r['pin_s']:.2f} | "
              f"{r['pin_GiBps']:.2f} | {r['d2h_GiBps']:.1f} | {excess} | "
              f"{'—' if r['fork_child_reads'] is None else 'yes' if r['fork_child_reads'] else '**no**'} | "
              f"{'—' if r['fork_s'] is None else format(r['fork_s'], '.3f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
