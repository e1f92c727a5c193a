"""GPU benchmark: the recipec runtime (Megatron-Core + Transformer Engine) against a plain
transformers training loop of the same model, in ONE Python process on one GPU.

    python bench/gpu_bench.py [--steps 30] [--warmup 10] [--variants hf,bf16,fp8_tensorwise,fp8_delayed]
                              [--out DIR] [--deadline-s SECONDS] [--smoke]

Model: the bundled `llama32_1b` recipe (Llama-3.2-1B shape: 16 layers, hidden 2048, 32 heads,
8 query groups, ffn 8192, vocab 128256, tied embeddings) at seq 4096, micro batch 2, global
batch 2, mock data, no checkpoints. Every variant is timed per step (device synchronised at the
end of each step), the first --warmup steps are discarded, and the mean of the rest is reported.

Variants (each caught on failure; the error goes into the table and the rest still run):
  hf              transformers LlamaForCausalLM, attn_implementation="sdpa"; fp32 parameters
                  (= the fp32 master weights) under torch.autocast(bfloat16), torch AdamW
                  (fused=True), grad clipping 1.0: the simple, honest mixed-precision loop.
  bf16            recipec runtime (`recipec.runtime.train.run`) with the TE layer spec, bf16
                  params, fp32 master weights and Adam state in Megatron's distributed optimizer.
  fp8_tensorwise  as bf16 + precision.fp8="tensorwise" (TE Float8CurrentScaling, hybrid format).
  fp8_delayed     as bf16 + precision.fp8="delayed" (TE DelayedScaling, amax history 1024).
  *_mbs4          the same at micro batch 4 / global batch 4 (an extra data point).

TFLOP/s per GPU = the compiler's plan["flops_per_step"] (Megatron-LM's formula) / step time, the
same count for every variant, the transformers loop included. MFU is against the H100 SXM dense
bf16 peak, 989 TFLOP/s (also for the fp8 rows). Peak memory is torch.cuda.max_memory_allocated()
over the variant (stats reset before each one). The table is printed last; results.json and the
per-variant metrics.jsonl go under --out (default $OUT when set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.0


def _import_recipec() -> None:
    """Make `import recipec.*` work from a plain checkout (the GPU machine has no install)."""
    try:
        import recipec.compiler
        import recipec.runtime
        return
    except ImportError:
        pass
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "recipec_pkg"
    pkg = root / "recipec"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("compiler", "runtime", "recipes_toml"):
        link = pkg / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    import recipec.compiler  # noqa: F401


# ---------------------------------------------------------------- configuration

def split_variant(variant: str) -> tuple[str, bool, set[str]]:
    """'bf16_mbs4+nonan+nooverlap' -> ('bf16', True, {'nonan', 'nooverlap'})."""
    head, *mods = variant.split("+")
    unknown = set(mods) - set(MODIFIERS)
    if unknown:
        raise ValueError(f"unknown modifier(s) {sorted(unknown)}; known: {sorted(MODIFIERS)}")
    return head.removesuffix("_mbs4"), head.endswith("_mbs4"), set(mods)


MODIFIERS = {
    "nooverlap": "optimizer.overlap_grad_reduce=false, overlap_param_gather=false (recipe overrides)",
    "nonan": "DDP check_for_nan_in_grad off (bench patch: 2 host syncs per grad bucket otherwise)",
    "nofreeze": "runtime's gc.freeze() patched out (the runtime before this bench's fix)",
    "nogc": "Python's cyclic GC disabled during the run (bench, diagnostic)",
    "prof": "torch.profiler over steps 25-26 (timing of the row includes profiler overhead)",
}


def overrides_for(args: argparse.Namespace, variant: str, out_dir: Path) -> list[str]:
    base, mbs4, mods = split_variant(variant)
    mbs = 4 if mbs4 else args.micro_batch
    gbs = mbs * args.gbs_multiple
    ov = [
        f"model.seq_length={args.seq}",
        f"train.micro_batch_size={mbs}",
        f"train.global_batch_size={gbs}",
        f"train.train_iters={args.steps}",
        "~train.eval_interval",
        "launch.nodes=1",
        "launch.gpus_per_node=1",
        "data.kind=mock",
        "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last",
        "logging.log_interval=1",
        f'launch.output_dir="{Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_bench_runs" / variant.replace("+", "-")}"',
    ]
    if "nooverlap" in mods:
        ov += ["optimizer.overlap_grad_reduce=false", "optimizer.overlap_param_gather=false"]
    if "prof" in mods:
        ov += ["profiling.use_torch_profiler=true", f"profiling.profile_step_start={args.steps - 6}",
               f"profiling.profile_step_end={args.steps - 4}"]
    if base == "fp8_tensorwise":
        ov += ['precision.fp8="tensorwise"', 'precision.fp8_format="hybrid"']
    elif base == "fp8_delayed":
        ov += ['precision.fp8="delayed"', 'precision.fp8_format="hybrid"']
    if args.smoke:  # tiny shape so the script itself can be checked on a CPU box
        ov += ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
               "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=32",
               "model.vocab_size=512", "launch.accelerator=\"cpu\""]
    return ov


def compile_variant(args: argparse.Namespace, variant: str, out_dir: Path) -> tuple[Any, Path]:
    from recipec.compiler.api import build

    compiled = build("llama32_1b", overrides_for(args, variant, out_dir))
    build_dir = compiled.write(Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_bench_build" / variant.replace("+", "-"))
    return compiled, build_dir


# ---------------------------------------------------------------- measurement helpers

def summarize(step_times: list[float], warmup: int, flops: int, tokens: int) -> dict[str, Any]:
    timed = step_times[warmup:]
    if not timed:
        raise RuntimeError(f"no timed steps: {len(step_times)} steps, warm-up {warmup}")
    mean = sum(timed) / len(timed)
    tflops = flops / mean / 1e12
    return {
        "steps_timed": len(timed),
        "step_time_s": mean,
        "step_time_median_s": statistics.median(timed),
        "step_time_stdev_s": statistics.pstdev(timed),
        "tokens_per_s": tokens / mean,
        "tflops_per_gpu": tflops,
        "mfu": tflops / H100_BF16_DENSE_TFLOPS,
    }


def _leak_report() -> None:
    """Print what still holds large CUDA tensors after a variant (run() should free everything)."""
    import functools

    import torch

    if not torch.cuda.is_available():
        return
    alloc = torch.cuda.memory_allocated() / 2**30
    print(f"bench: {alloc:.2f} GiB still allocated after the variant", flush=True)
    if alloc < 1.0:
        return
    big = sorted((o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda
                  and o.numel() * o.element_size() > 2**27), key=lambda t: -t.numel() * t.element_size())
    seen = {id(big)}
    for t in big[:3]:
        chain, obj = [], t
        for _ in range(6):
            refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and not inspect_frame(r)]
            if not refs:
                break
            obj = refs[0]
            seen.add(id(obj))
            desc = type(obj).__name__
            if isinstance(obj, dict):
                desc += "{" + ",".join(map(str, list(obj)[:4])) + "}"
            elif hasattr(obj, "__qualname__"):
                desc += f" {obj.__qualname__}"
            chain.append(desc)
        print(f"bench: {tuple(t.shape)} {t.dtype} held by " + " <- ".join(chain), flush=True)
    del big
    cleared = 0
    for o in gc.get_objects():
        if isinstance(o, functools._lru_cache_wrapper):
            o.cache_clear()
            cleared += 1
    gc.collect()
    torch.cuda.empty_cache()
    print(f"bench: after clearing {cleared} lru caches: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated",
          flush=True)


def inspect_frame(obj: Any) -> bool:
    import types

    return isinstance(obj, (types.FrameType, list)) and not isinstance(obj, dict)


def _cleanup() -> None:
    import torch

    try:  # TE keeps FP8 amax/scale buffers of past models in a global registry
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        FP8GlobalStateManager.reset()
    except Exception:  # noqa: BLE001, S110 - no TE, or another TE layout
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# ---------------------------------------------------------------- (a) transformers loop

def run_hf(args: argparse.Namespace, compiled: Any, pure_bf16: bool = False) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c, plan = compiled.config, compiled.plan
    m = c.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rope_scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": m.rope_original_max_position_embeddings}
    cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base, rope_scaling=rope_scaling,
        tie_word_embeddings=m.share_embeddings_and_output_weights, attention_bias=False, mlp_bias=False,
        use_cache=False, initializer_range=m.init_method_std,
    )
    torch.manual_seed(c.train.seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                              torch_dtype=torch.bfloat16 if pure_bf16 else torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    o = c.optimizer
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                            fused=device.type == "cuda")
    mbs, gbs, seq = c.train.micro_batch_size, c.train.global_batch_size, m.seq_length
    accum = gbs // mbs
    gen = torch.Generator(device=device).manual_seed(c.train.seed)
    times, losses = [], []
    for _step in range(c.train.train_iters):
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            # seq+1 tokens: HF shifts labels inside, so every position of the seq trains.
            ids = torch.randint(0, m.vocab_size, (mbs, seq + 1), device=device, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
            loss = out.loss / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))  # host sync: the step is finished on the device
        times.append(time.perf_counter() - t0)
    res = summarize(times, args.warmup, plan.flops_per_step, plan.tokens_per_step)
    res.update(peak_mem_gib=peak_gib(), params=params, loss_first=losses[0], loss_last=losses[-1],
               step_times=times)
    del model, opt, out, loss
    return res


# ---------------------------------------------------------------- (b, c) recipec runtime

def run_runtime(args: argparse.Namespace, variant: str, compiled: Any, build_dir: Path, port: int) -> dict[str, Any]:
    from recipec.runtime import train
    from recipec.runtime.artifact import load_artifact

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for k, v in compiled.plan.env.items():
        os.environ[k] = str(v)  # what launch.sh would export (restored after the variant)
    artifact = load_artifact(build_dir)
    out_dir = Path(artifact.config.launch.output_dir.format(name=artifact.config.name))
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    from recipec.runtime.layer_spec import (
        LOCAL_LABEL,
        TE_LABEL,
        _have_transformer_engine,
    )

    backend = TE_LABEL if _have_transformer_engine() else LOCAL_LABEL
    _, _, mods = split_variant(variant)
    from recipec.runtime import model as rmodel

    orig_wrap, orig_gc = rmodel.wrap_ddp, train.gc
    if "nonan" in mods:
        def wrap_ddp_nonan(*a: Any, **k: Any) -> Any:
            chunks = orig_wrap(*a, **k)
            for chunk in chunks:  # the buffers read this same config object at every bucket
                chunk.ddp_config.check_for_nan_in_grad = False
            return chunks
        rmodel.wrap_ddp = wrap_ddp_nonan
    if "nofreeze" in mods and hasattr(train, "gc"):
        import types

        train.gc = types.SimpleNamespace(collect=gc.collect, freeze=lambda: None, unfreeze=lambda: None)
    if "nogc" in mods:
        gc.disable()
    try:
        rc = train.run(artifact)
    finally:
        rmodel.wrap_ddp, train.gc = orig_wrap, orig_gc
        gc.enable()
    if rc != 0:
        raise RuntimeError(f"train.run returned {rc}")
    peak = peak_gib()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = [r for r in rows if "window_steps" in r]
    steps = [r for r in rows if "loss" in r]
    if any(r["window_steps"] != 1 for r in windows):
        raise RuntimeError("expected logging.log_interval=1 (one throughput line per step)")
    times = [r["step_time_s"] for r in windows]
    plan = compiled.plan
    res = summarize(times, args.warmup, plan.flops_per_step, plan.tokens_per_step)
    if "prof" in mods:
        res["profile"] = profile_summary(out_dir / "profile", Path(args.out), variant)
    res.update(peak_mem_gib=peak, est_mem_gib=plan.memory_gib["total"], est_mem=dict(plan.memory_gib),
               meter_mem_gib=windows[-1].get("mem_gib"), params=plan.params_total,
               loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"],
               skipped=sum(1 for r in steps if r.get("grad_norm") is None), step_times=times,
               layer_spec=backend, meter_tflops=statistics.mean(r["tflops_per_gpu"] for r in windows[args.warmup:]))
    return res


def profile_summary(trace_dir: Path, out_root: Path, variant: str) -> dict[str, Any]:
    """GPU busy vs idle over the profiled steps, kernel time by kind, host syncs; the trace is
    gzipped to OUT/trace_<variant>.json.gz for a closer look."""
    import gzip
    import re

    traces = sorted(trace_dir.glob("*.json"))
    if not traces:
        return {"error": f"no trace under {trace_dir}"}
    data = json.loads(traces[-1].read_text())
    with gzip.open(out_root / f"trace_{variant.replace('+', '-')}.json.gz", "wt") as f:
        json.dump(data, f)
    events = [e for e in data.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        return {"error": "no kernels in trace"}
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy, cur_s, cur_e = 0.0, kernels[0]["ts"], kernels[0]["ts"] + kernels[0]["dur"]
    for e in kernels[1:]:
        if e["ts"] > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = e["ts"], e["ts"] + e["dur"]
        else:
            cur_e = max(cur_e, e["ts"] + e["dur"])
    busy += cur_e - cur_s
    kinds = {"attention": r"fmha|flash|sdpa|attn", "gemm": r"gemm|nvjet|cutlass|xmma|sm90_|s16816|wgmma",
             "nccl": r"nccl", "adam/optimizer": r"adam|multi_tensor", "cast/amax/quantize": r"cast|amax|quantize|fp8",
             "norm": r"norm", "cross-entropy": r"cross_entropy|entropy|softmax"}
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        name = e.get("name", "")
        kind = next((k for k, pat in kinds.items() if re.search(pat, name, re.IGNORECASE)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
        by_name[name[:90]] = by_name.get(name[:90], 0.0) + e["dur"]
    runtime_calls: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and re.search(r"Synchronize|Memcpy", e.get("name", "")):
            runtime_calls.setdefault(e["name"], []).append(e["dur"])
    summary = {
        "gpu_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3, "gpu_idle_frac": 1 - busy / span,
        "kernels": len(kernels),
        "kernel_ms_by_kind": {k: round(v / 1e3, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v / 1e3, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]},
        "host_sync_calls": {k: [len(v), round(sum(v) / 1e3, 2)] for k, v in runtime_calls.items()},
    }
    print(f"profile {variant}: " + json.dumps(summary, indent=1), flush=True)
    return summary


def _teardown_dist() -> None:
    """After a failed runtime variant: leave no process group or model-parallel state behind."""
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001, S110
        pass
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110
        pass


# ---------------------------------------------------------------- report

def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": sys.version.split()[0]}
    import torch

    out["torch"] = torch.__version__
    out["cuda"] = str(torch.version.cuda)
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    for name, mod in (("transformer_engine", "transformer_engine"), ("megatron_core", "megatron.core"),
                      ("transformers", "transformers")):
        try:
            module = __import__(mod, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            out[name] = f"not importable ({type(exc).__name__})"
    try:
        import cudnn  # type: ignore[import-not-found]

        out["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
    except Exception:  # noqa: BLE001, S110
        pass
    try:  # torch's own cuDNN check; TE may have loaded another cuDNN first (seen: 9.14 vs 9.19)
        out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception as exc:  # noqa: BLE001
        out["cudnn"] = f"check failed: {str(exc)[:90]}"
    return out


LABELS = {
    "hf": "(a) transformers LlamaForCausalLM (sdpa), fp32 master + autocast bf16, fused AdamW",
    "bf16": "(b) recipec runtime, {spec}, bf16 (dist. optimizer, fp32 master)",
    "fp8_tensorwise": "(c) recipec runtime, {spec}, FP8 tensorwise (current scaling)",
    "fp8_delayed": "(c) recipec runtime, {spec}, FP8 delayed scaling",
    "hf_bf16": "reference: transformers loop with pure bf16 params + fused AdamW (no fp32 master)",
}


def label(variant: str, r: dict[str, Any]) -> str:
    base, mbs4, mods = split_variant(variant)
    spec = {"transformer_engine": "TE spec", None: "TE spec"}.get(r.get("layer_spec"), r.get("layer_spec"))
    return (LABELS.get(base, base).format(spec=spec) + (" [mbs 4]" if mbs4 else "")
            + "".join(f" +{m}" for m in sorted(mods)))


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        ("| variant | mbs x seq | step time (ms) | median (ms) | tokens/s | TFLOP/s/GPU | MFU (989) | vs transformers "
        "| peak mem (GiB) | est. mem (GiB) | loss first→last |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for variant, r in results.items():
        ref_name = "hf_mbs4" if split_variant(variant)[1] else "hf"
        ref = results.get(ref_name, {})
        shape = r.get("shape", "")
        if "error" in r:
            lines.append(f"| {label(variant, r)} | {shape} | failed: {r['error']} | | | | | | | | |")
            continue
        ratio = (f"{r['tflops_per_gpu'] / ref['tflops_per_gpu']:.2f}x"
                 if ref.get("tflops_per_gpu") else "n/a")
        est = f"{r['est_mem_gib']:.1f}" if r.get("est_mem_gib") is not None else "—"
        lines.append(
            f"| {label(variant, r)} | {shape} | {r['step_time_s'] * 1e3:.1f} | {r['step_time_median_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {r['mfu'] * 100:.1f}% | {ratio} | {r['peak_mem_gib']:.1f} | {est} | "
            f"{r['loss_first']:.3f}→{r['loss_last']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="hf,bf16,fp8_tensorwise,fp8_delayed")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps discarded from timing")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gbs-multiple", type=int, default=1, help="global batch = micro batch x this")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_bench")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="skip variants not started within this many seconds (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="tiny model, for checking the script on CPU")
    p.add_argument("--isolate", action="store_true",
                   help="run each variant in its own child process (fallback if in-process runs leak memory)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq = 64

    _import_recipec()
    from recipec.runtime import train

    train._setup_logging()
    start = time.perf_counter()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    info = versions()
    print("bench environment:", json.dumps(info), flush=True)

    results: dict[str, dict[str, Any]] = {}
    port = 29600 + os.getpid() % 1000
    for i, variant in enumerate(v.strip() for v in args.variants.split(",") if v.strip()):
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            results[variant] = {"error": "skipped (bench deadline reached)"}
            continue
        if args.isolate:
            import subprocess

            cmd = [sys.executable, __file__, "--variants", variant, "--out", str(out_dir), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
                   "--gbs-multiple", str(args.gbs_multiple)] + (["--smoke"] if args.smoke else [])
            subprocess.run(cmd, check=False)
            try:
                results[variant] = json.loads((out_dir / "results.json").read_text())["results"][variant]
            except Exception as exc:  # noqa: BLE001
                results[variant] = {"error": f"child process gave no result ({type(exc).__name__})"}
            (out_dir / "results.json").write_text(json.dumps({"env": info, "args": vars(args), "results": results},
                                                             indent=1, default=str))
            continue
        print(f"\n=== variant {variant} ===", flush=True)
        _cleanup()
        saved_env = dict(os.environ)
        t0 = time.perf_counter()
        try:
            compiled, build_dir = compile_variant(args, variant, out_dir)
            shape = f"{compiled.config.train.micro_batch_size} x {compiled.config.model.seq_length}"
            base = split_variant(variant)[0]
            if base in ("hf", "hf_bf16"):
                res = run_hf(args, compiled, pure_bf16=base == "hf_bf16")
            else:
                res = run_runtime(args, variant, compiled, build_dir, port + i)
            res["shape"] = shape
            res["gbs"] = compiled.config.train.global_batch_size
            res["flops_per_step"] = compiled.plan.flops_per_step
        except Exception as exc:  # noqa: BLE001 - a failed variant must not stop the others
            tb = traceback.format_exc()
            print(tb, flush=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            res = {"error": f"{type(exc).__name__}: {first}"[:300].replace("|", "/"), "traceback": tb}
            del exc
            _teardown_dist()
        os.environ.clear()
        os.environ.update(saved_env)
        res["wall_s"] = time.perf_counter() - t0
        gc.collect()
        _leak_report()
        results[variant] = res
        if "error" not in res:
            print(f"--- {variant}: {res['step_time_s'] * 1e3:.1f} ms/step, {res['tflops_per_gpu']:.1f} TFLOP/s, "
                  f"peak {res['peak_mem_gib']:.1f} GiB ({res['wall_s']:.0f} s)", flush=True)
        (out_dir / "results.json").write_text(json.dumps({"env": info, "args": vars(args), "results": results},
                                                         indent=1, default=str))
        _cleanup()

    print("\nbench environment:", json.dumps(info))
    print(f"TFLOP/s: Megatron-LM formula from the compiled plan (flops_per_step), the same for every row; "
          f"MFU against the H100 dense bf16 peak {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s (fp8 rows too); "
          f"mean over steps {args.warmup + 1}..{args.steps} (first {args.warmup} discarded); "
          f"total {time.perf_counter() - start:.0f} s\n")
    used = {m for v in results for m in split_variant(v)[2]}
    for m in sorted(used):
        print(f"+{m}: {MODIFIERS[m]}")
    print(table(results), flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
