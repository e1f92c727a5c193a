"""GPU benchmark: the recipec runtime (Megatron-Core + Transformer Engine) against a plain
transformers training loop of the same model on one GPU: all variants in one Python process, or
with --isolate each in its own child process (nothing, leaked memory included, carries over).

    python bench/gpu_bench.py [--steps 30] [--warmup 10] [--variants hf,bf16,fp8_tensorwise,bf16@8b]
                              [--out DIR] [--deadline-s SECONDS] [--isolate] [--cpu --tiny]

What users run: every row takes --gbs-multiple (8) microbatches per optimizer step (global batch =
micro batch x 8), the transformers loop included (the same gradient accumulation); `+mb1` rows take
one microbatch per step, a probe of the fixed per-step host and optimizer cost (compare them with
the same variant without +mb1). `python bench/gpu_bench.py --plan` prints the row plan and exits.

Shapes (a variant's `@shape` suffix; none means 1b):
  1b   the bundled `llama32_1b` recipe (Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 query
       groups, ffn 8192, vocab 128256, tied embeddings) at seq --seq (4096), micro batch
       --micro-batch (2).
  8b   the issue-7 "8B layer shape": the `llama3_8b` recipe with model.num_layers=8 (hidden 4096,
       ffn 14336, 32 heads, 8 query groups, vocab 128256, untied) at seq 8192, micro batch 1,
       context parallel 1.
Both on one GPU (launch.nodes=1, gpus_per_node=1), global batch = micro batch x --gbs-multiple (8;
1 for +mb1), mock data, no checkpoints, no eval.

Timing. The transformers loop is timed per step (it reads its loss every step, which syncs the
device). The runtime is timed from its own metrics.jsonl throughput lines: the recipe's
logging.log_interval is kept (10 in `_base/pretrain`, what ships), and each line is the mean step
time of one log window, measured with a device sync at the window's end. Windows (or steps) that
end within the first --warmup steps are discarded; the table gives the mean of the rest. Keep
--warmup a multiple of the log interval.

Variants (each caught on failure; the error goes into the table and the rest still run):
  hf              transformers LlamaForCausalLM, attn_implementation="sdpa"; fp32 parameters
                  (= the fp32 master weights) under torch.autocast(bfloat16), torch AdamW
                  (fused=True), grad clipping 1.0: the simple, honest mixed-precision loop.
  bf16            recipec runtime (`recipec.runtime.train.run`) with the TE layer spec, bf16
                  params, fp32 master weights and Adam state in Megatron's distributed optimizer.
  fp8_tensorwise  as bf16 + precision.fp8="tensorwise" (TE Float8CurrentScaling, hybrid format).
  fp8_delayed     as bf16 + precision.fp8="delayed" (TE DelayedScaling, amax history 1024).
  fp8_blockwise   as bf16 + precision.fp8="blockwise", fp8_format="e4m3" (TE Float8BlockScaling,
                  1x128/128x128 blocks; Hopper or newer and TE >= 2.3).
                  FP8 rows run only where TE says the GPU supports the recipe; elsewhere the row
                  says "skipped" and why (not a failure).
  hf_bf16         reference: the transformers loop with pure bf16 params (no fp32 master).
  *_mbs4          the same at micro batch 4 / global batch 4 (an extra data point).
  modifiers       `+name` after the variant, see MODIFIERS (recipe overrides, no patches).

TFLOP/s per GPU = the compiler's plan["flops_per_step"] (Megatron-LM's formula) / step time, the
same count for every variant, the transformers loop included. MFU is against the H100 SXM dense
bf16 peak, 989 TFLOP/s (also for the fp8 rows). Peak memory is torch.cuda.max_memory_allocated()
over the variant (stats reset before each one); "est. error" compares it with the compiler's
plan.memory_gib["total"]. The table is printed last; results.json goes under --out (default $OUT
when set), each runtime variant's metrics.jsonl under $TMPDIR/gpu_bench_runs/.
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
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import recipec_pythonpath

H100_BF16_DENSE_TFLOPS = 989.0


def _import_recipec() -> None:
    """Make `import recipec.*` work from a plain checkout (the GPU machine has no install)."""
    recipec_pythonpath()
    import recipec.compiler  # noqa: F401


# ---------------------------------------------------------------- configuration

class Variant(NamedTuple):
    base: str  # hf, hf_bf16, bf16, fp8_tensorwise, fp8_delayed
    mbs4: bool
    shape: str  # a key of SHAPES
    mods: frozenset[str]


def split_variant(variant: str) -> Variant:
    """'bf16_mbs4@8b+nonan' -> Variant('bf16', True, '8b', {'nonan'})."""
    head, *mods = variant.split("+")
    unknown = set(mods) - set(MODIFIERS)
    if unknown:
        raise ValueError(f"unknown modifier(s) {sorted(unknown)}; known: {sorted(MODIFIERS)}")
    head, _, shape = head.partition("@")
    shape = shape or "1b"
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    return Variant(head.removesuffix("_mbs4"), head.endswith("_mbs4"), shape, frozenset(mods))


# Every modifier but +nofuse is a recipe override (runtime 1107e1a made the NaN check and the GC
# configurable); the former bench patches +nofreeze and +nogc are gone: +gc0 is the old
# automatic-GC behaviour, and the runtime's default (manual_gc_interval=100) is what +nogc measured.
MODIFIERS = {
    "nonan": "train.check_for_nan_in_grad=false (DDP's per-bucket NaN check off)",
    "gc0": "train.manual_gc_interval=0 (Python's automatic GC during the loop, no gc.freeze)",
    "log1": "logging.log_interval=1 (a host sync and a throughput line every step)",
    "nooverlap": ("optimizer.overlap_grad_reduce=false, overlap_param_gather=false (a no-op on one GPU "
                  "since runtime 1107e1a: overlap is ignored at data-parallel size 1)"),
    "prof": "torch.profiler over 2 steps near the end (timing of the row includes profiler overhead)",
    "cg": 'train.cuda_graph="layers" (per-layer CUDA graphs, Megatron-Core local impl)',
    "cgfull": 'train.cuda_graph="full_iteration" (one CUDA graph for forward+backward of the step)',
    "local": 'model.transformer_impl="local" (Megatron-Core local modules + torch SDPA, no TE)',
    "compile": 'train.torch_compile=true (inductor per transformer layer; the local modules)',
    "nofuse": ("runtime.model.TE_WGRAD_FUSION = False: TE linears without fused wgrad accumulation (the "
               "runtime's behaviour before it set fuse_wgrad_accumulation on them; the one bench-side switch, "
               "no recipe key)"),
    "mb1": ("one microbatch per step (global batch = micro batch): the host-overhead probe; the step's fixed "
            "cost (optimizer, grad norm, launches) over 1/8 of the tokens"),
    "pao": ("optimizer.use_precision_aware_optimizer=true, exp_avg_dtype=exp_avg_sq_dtype=\"bf16\" (Megatron's "
            "precision-aware optimizer in TE's FusedAdam: bf16 Adam moments, fp32 master weights)"),
}

# The recipe overrides of each modifier (prof depends on --steps; nofuse is a runtime switch).
MODIFIER_OVERRIDES: dict[str, list[str]] = {
    "log1": ["logging.log_interval=1"],
    "nonan": ["train.check_for_nan_in_grad=false"],
    "gc0": ["train.manual_gc_interval=0"],
    "nooverlap": ["optimizer.overlap_grad_reduce=false", "optimizer.overlap_param_gather=false"],
    "cg": ['train.cuda_graph="layers"'],
    "cgfull": ['train.cuda_graph="full_iteration"'],
    "local": ['model.transformer_impl="local"'],
    "compile": ["train.torch_compile=true", 'model.transformer_impl="local"'],
    "pao": ["optimizer.use_precision_aware_optimizer=true", 'optimizer.exp_avg_dtype="bf16"',
            'optimizer.exp_avg_sq_dtype="bf16"'],
}

FP8_RECIPES = {"fp8_tensorwise": ("tensorwise", "hybrid"), "fp8_delayed": ("delayed", "hybrid"),
               "fp8_blockwise": ("blockwise", "e4m3")}
RUNTIME_BASES = ("bf16", *FP8_RECIPES)
HF_BASES = ("hf", "hf_bf16")
DEFAULT_VARIANTS = ("hf,bf16,bf16+mb1,bf16+pao,fp8_tensorwise,fp8_delayed,fp8_blockwise,"
                    "hf@8b,bf16@8b,bf16@8b+pao,fp8_delayed@8b,fp8_blockwise@8b")

# recipe, fixed overrides, seq and micro batch (None: from the command line)
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"recipe": "llama32_1b", "overrides": [], "seq": None, "mbs": None},
    "8b": {"recipe": "llama3_8b", "overrides": ["model.num_layers=8"], "seq": 8192, "mbs": 1},
}


def overrides_for(args: argparse.Namespace, variant: str) -> list[str]:
    v = split_variant(variant)
    shape = SHAPES[v.shape]
    seq = shape["seq"] or args.seq
    mbs = 4 if v.mbs4 else (shape["mbs"] or args.micro_batch)
    gbs = mbs * microbatches(args, variant)
    ov = [
        *shape["overrides"],
        f"model.seq_length={seq}",
        f"train.micro_batch_size={mbs}",
        f"train.global_batch_size={gbs}",
        f"train.train_iters={args.steps}",
        "~train.eval_interval",
        "launch.nodes=1",
        "launch.gpus_per_node=1",
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.context_parallel_size=1",
        "data.kind=mock",
        "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last",
        f'launch.output_dir="{Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_bench_runs" / safe_name(variant)}"',
    ]
    if args.log_interval:
        ov.append(f"logging.log_interval={args.log_interval}")
    for mod in sorted(v.mods):
        ov += MODIFIER_OVERRIDES.get(mod, [])
    if "prof" in v.mods:
        ov += ["profiling.use_torch_profiler=true", f"profiling.profile_step_start={args.steps - 6}",
               f"profiling.profile_step_end={args.steps - 4}"]
    if v.base in FP8_RECIPES:
        recipe, fmt = FP8_RECIPES[v.base]
        ov += [f'precision.fp8="{recipe}"', f'precision.fp8_format="{fmt}"']
    if args.tiny:  # tiny shape so the script itself can be checked on a CPU box
        ov += ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
               "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=32",
               "model.vocab_size=512"]
        ov = [o for o in ov if not o.startswith("model.seq_length=")] + [f"model.seq_length={args.seq}"]
    if args.cpu:
        ov.append('launch.accelerator="cpu"')
    return ov


def microbatches(args: argparse.Namespace, variant: str) -> int:
    """Microbatches per optimizer step: --gbs-multiple (8: what users run), 1 for the +mb1 probe."""
    return 1 if "mb1" in split_variant(variant).mods else args.gbs_multiple


def row_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row this run will measure: variant, microbatches per step, recipe and overrides
    (checked on CPU by tests/bench/test_benches.py; `--plan` prints it)."""
    rows = []
    for variant in (v.strip() for v in args.variants.split(",") if v.strip()):
        v = split_variant(variant)
        rows.append({"variant": variant, "kind": "transformers" if v.base in HF_BASES else "runtime",
                     "microbatches": microbatches(args, variant), "recipe": SHAPES[v.shape]["recipe"],
                     "overrides": overrides_for(args, variant)})
    return rows


def unsupported(variant: str) -> str | None:
    """Why this machine cannot run the variant (an FP8 recipe the GPU or TE lacks, the precision-
    aware optimizer without TE on CUDA), or None. Asked in the process that runs the row."""
    v = split_variant(variant)
    if v.base not in FP8_RECIPES and "pao" not in v.mods:
        return None
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import transformer_engine
        import transformer_engine.pytorch
    except Exception as exc:  # noqa: BLE001 - any import failure means no TE here
        return f"needs Transformer Engine ({type(exc).__name__}: {str(exc)[:80]})"
    if v.base not in FP8_RECIPES:
        return None
    recipe = FP8_RECIPES[v.base][0]
    check = {"blockwise": "check_fp8_block_scaling_support"}.get(recipe, "check_fp8_support")
    import importlib

    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            fn = getattr(importlib.import_module(module), check, None)
        except Exception:  # noqa: BLE001, S112 - another TE layout
            continue
        if fn is not None:
            ok, reason = fn()
            return None if ok else f"TE: {reason} (capability {torch.cuda.get_device_capability()})"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"FP8 needs compute capability 8.9+ (Ada/Hopper), this GPU has {cap[0]}.{cap[1]}"
    if recipe == "blockwise":
        te_version = tuple(int(x) for x in transformer_engine.__version__.split(".")[:2] if x.isdigit())
        if cap < (9, 0) or te_version < (2, 3):
            return (f"FP8 blockwise needs Hopper+ (capability 9.0) and TE >= 2.3; here {cap[0]}.{cap[1]}, "
                    f"TE {transformer_engine.__version__}")
    return None


def safe_name(variant: str) -> str:
    return variant.replace("+", "-").replace("@", "-")


def compile_variant(args: argparse.Namespace, variant: str) -> tuple[Any, Path]:
    from recipec.compiler.api import build

    compiled = build(SHAPES[split_variant(variant).shape]["recipe"], overrides_for(args, variant))
    build_dir = compiled.write(Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_bench_build" / safe_name(variant))
    return compiled, build_dir


# ---------------------------------------------------------------- measurement helpers

def summarize(step_times: list[float], warmup: int, flops: int, tokens: int,
              window_steps: list[int] | None = None) -> dict[str, Any]:
    """Mean step time over the steps after `warmup`. `step_times` are per step, or, with
    `window_steps`, the mean step time of each log window of that many steps; then only the
    windows that start after the warm-up count, and median/stdev are over window means."""
    if window_steps is None:
        window_steps = [1] * len(step_times)
    ends = [sum(window_steps[: i + 1]) for i in range(len(window_steps))]
    timed = [(t, n) for t, n, end in zip(step_times, window_steps, ends) if end - n >= warmup]
    if not timed:
        raise RuntimeError(f"no timed steps: {len(step_times)} windows, warm-up {warmup}")
    n_steps = sum(n for _, n in timed)
    mean = sum(t * n for t, n in timed) / n_steps
    tflops = flops / mean / 1e12
    return {
        "steps_timed": n_steps,
        "timing_unit": "step" if all(n == 1 for _, n in timed) else f"window of {timed[0][1]} steps",
        "step_time_s": mean,
        "step_time_median_s": statistics.median(t for t, _ in timed),
        "step_time_stdev_s": statistics.pstdev(t for t, _ in timed),
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
    rope_scaling = ({"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0,
                     "original_max_position_embeddings": m.rope_original_max_position_embeddings}
                    if m.rope_scaling else None)
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
    from recipec.runtime import model as runtime_model
    from recipec.runtime.layer_spec import (
        LOCAL_LABEL,
        TE_LABEL,
        _have_transformer_engine,
    )

    cfg = artifact.config
    impl = cfg.model.transformer_impl
    use_te = impl == "transformer_engine" or (impl == "auto" and _have_transformer_engine()
                                              and not cfg.train.torch_compile)
    backend = TE_LABEL if use_te else LOCAL_LABEL
    mods = split_variant(variant).mods
    fusion = runtime_model.TE_WGRAD_FUSION
    runtime_model.TE_WGRAD_FUSION = "nofuse" not in mods
    try:
        rc = train.run(artifact)
    finally:
        runtime_model.TE_WGRAD_FUSION = fusion
    if rc != 0:
        raise RuntimeError(f"train.run returned {rc}")
    peak = peak_gib()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = [r for r in rows if "window_steps" in r]
    steps = [r for r in rows if "loss" in r]
    times = [r["step_time_s"] for r in windows]
    sizes = [r["window_steps"] for r in windows]
    plan = compiled.plan
    res = summarize(times, args.warmup, plan.flops_per_step, plan.tokens_per_step, window_steps=sizes)
    if "prof" in mods:
        res["profile"] = profile_summary(out_dir / "profile", Path(args.out), variant)
    res.update(peak_mem_gib=peak, est_mem_gib=plan.memory_gib["total"], est_mem=dict(plan.memory_gib),
               meter_mem_gib=windows[-1].get("mem_gib"), params=plan.params_total,
               loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"],
               skipped=sum(1 for r in steps if r.get("grad_norm") is None), step_times=times, window_steps=sizes,
               log_interval=artifact.config.logging.log_interval,
               manual_gc_interval=artifact.config.train.manual_gc_interval,
               check_for_nan_in_grad=artifact.config.train.check_for_nan_in_grad,
               layer_spec=backend, te_wgrad_fusion="nofuse" not in mods and use_te,
               cuda_graph=cfg.train.cuda_graph, torch_compile=cfg.train.torch_compile,
               losses=[[r["step"], r["loss"]] for r in steps], mem_err=(peak - plan.memory_gib["total"]) / plan.memory_gib["total"])
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
    with gzip.open(out_root / f"trace_{safe_name(variant)}.json.gz", "wt") as f:
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
    "fp8_blockwise": "(c) recipec runtime, {spec}, FP8 blockwise (1x128/128x128 blocks)",
    "hf_bf16": "reference: transformers loop with pure bf16 params + fused AdamW (no fp32 master)",
}


def label(variant: str, r: dict[str, Any]) -> str:
    v = split_variant(variant)
    spec = {"transformer_engine": "TE spec", None: "TE spec"}.get(r.get("layer_spec"), r.get("layer_spec"))
    return (LABELS.get(v.base, v.base).format(spec=spec) + (" [mbs 4]" if v.mbs4 else "")
            + "".join(f" +{m}" for m in sorted(v.mods)))


def reference_of(variant: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The plain transformers loop (fp32 master) at the same shape and micro batch, with the same
    microbatches per step when that row exists (hf+mb1 for a +mb1 row), else the default one."""
    v = split_variant(variant)
    found: dict[bool, dict[str, Any]] = {}
    for name, r in results.items():
        w = split_variant(name)
        if w.base == "hf" and w.mbs4 == v.mbs4 and w.shape == v.shape and w.mods <= {"mb1"}:
            found.setdefault("mb1" in w.mods, r)
    return found.get("mb1" in v.mods) or found.get(False) or {}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        ("| variant | shape | mbs x seq | step time (ms) | median (ms) | tokens/s | TFLOP/s/GPU | MFU (989) "
         "| vs transformers | peak mem (GiB) | est. mem (GiB) | est. error | loss first→last |"),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for variant, r in results.items():
        ref = reference_of(variant, results)
        shape = r.get("shape", "")
        name = split_variant(variant).shape
        if "error" in r or "unsupported" in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['unsupported']}"
            lines.append(f"| {label(variant, r)} | {name} | {shape} | {why} | | | | | | | | | |")
            continue
        ratio = (f"{r['tflops_per_gpu'] / ref['tflops_per_gpu']:.2f}x"
                 if ref.get("tflops_per_gpu") and ref is not r else ("1.00x" if ref is r else "n/a"))
        est = f"{r['est_mem_gib']:.1f}" if r.get("est_mem_gib") is not None else "—"
        err = f"{r['mem_err'] * 100:+.1f}%" if r.get("mem_err") is not None else "—"
        lines.append(
            f"| {label(variant, r)} | {name} | {shape} | {r['step_time_s'] * 1e3:.1f} | "
            f"{r['step_time_median_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {r['mfu'] * 100:.1f}% | {ratio} | {r['peak_mem_gib']:.1f} | {est} | {err} | "
            f"{r['loss_first']:.3f}→{r['loss_last']:.3f} |")
    return "\n".join(lines)


def loss_check(results: dict[str, dict[str, Any]]) -> str:
    """Each +nofuse row against its fused twin (same variant without +nofuse): the per-step losses
    (fused wgrad accumulation changes only the backward's rounding, so step 1 must match exactly)."""
    lines = []
    for variant, r in results.items():
        v = split_variant(variant)
        if "nofuse" not in v.mods or "losses" not in r:
            continue
        twin = variant.replace("+nofuse", "")
        f = results.get(twin, {})
        if "losses" not in f:
            continue
        a, b = dict(map(tuple, f["losses"])), dict(map(tuple, r["losses"]))
        common = sorted(set(a) & set(b))
        diffs = [abs(a[s] - b[s]) for s in common]
        lines.append(f"loss check {twin} (fused) vs {variant}: step 1 {a.get(1)!r} vs {b.get(1)!r}; "
                     f"max |diff| over {len(common)} steps {max(diffs) if diffs else float('nan'):.4g}; "
                     "steps " + ", ".join(f"{s}: {a[s]:.4f}/{b[s]:.4f}" for s in common if s in (1, 2, 3, 5, 10, 20, 30, 40)))
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def run_one(args: argparse.Namespace, variant: str, port: int) -> dict[str, Any]:
    """One variant in this process; failures come back as {"error": ...}."""
    print(f"\n=== variant {variant} ===", flush=True)
    _cleanup()
    saved_env = dict(os.environ)
    t0 = time.perf_counter()
    try:
        why = unsupported(variant)
        if why:
            print(f"--- {variant}: skipped: {why}", flush=True)
            return {"unsupported": why, "wall_s": time.perf_counter() - t0}
        compiled, build_dir = compile_variant(args, variant)
        shape = f"{compiled.config.train.micro_batch_size} x {compiled.config.model.seq_length}"
        base = split_variant(variant).base
        if base in HF_BASES:
            res = run_hf(args, compiled, pure_bf16=base == "hf_bf16")
        else:
            res = run_runtime(args, variant, compiled, build_dir, port)
        res["shape"] = shape
        res["gbs"] = compiled.config.train.global_batch_size
        res["flops_per_step"] = compiled.plan.flops_per_step
        res["overrides"] = overrides_for(args, variant)
        res["recipe"] = SHAPES[split_variant(variant).shape]["recipe"]
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
    if "error" not in res:
        print(f"--- {variant}: {res['step_time_s'] * 1e3:.1f} ms/step, {res['tflops_per_gpu']:.1f} TFLOP/s, "
              f"peak {res['peak_mem_gib']:.1f} GiB ({res['wall_s']:.0f} s)", flush=True)
    _cleanup()
    return res


def run_child(args: argparse.Namespace, argv: list[str], variant: str, start: float) -> tuple[dict[str, Any], dict]:
    """One variant in a fresh Python process (no memory or state left over from the last one)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_bench_child_") as tmp:
        child_json = Path(tmp) / "child.json"
        drop = {"--variants", "--deadline-s", "--child-json"}
        rest, skip = [], False
        for a in argv:
            if skip:
                skip = False
                continue
            if a.split("=")[0] in drop:
                skip = "=" not in a
                continue
            if a == "--isolate":
                continue
            rest.append(a)
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--variants", variant,
               "--child-json", str(child_json)]
        # A hung child must not take the whole call with it: at most until deadline + grace.
        limit = max(60.0, args.deadline_s + args.grace_s - (time.perf_counter() - start)) if args.deadline_s else None
        try:
            subprocess.run(cmd, check=False, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": f"child process killed after {limit:.0f} s"}, {}
        try:
            data = json.loads(child_json.read_text())
            return data["results"][variant], data["env"]
        except Exception as exc:  # noqa: BLE001
            return {"error": f"child process gave no result ({type(exc).__name__})"}, {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps discarded from timing (a multiple of the log interval)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length of the 1b shape")
    p.add_argument("--micro-batch", type=int, default=2, help="micro batch of the 1b shape")
    p.add_argument("--gbs-multiple", type=int, default=8,
                   help="microbatches per step: global batch = micro batch x this (+mb1 rows: 1)")
    p.add_argument("--log-interval", type=int, default=0,
                   help="logging.log_interval for the runtime (0: the recipe's own, 10 as shipped)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_bench")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="skip variants not started within this many seconds (0: no limit)")
    p.add_argument("--grace-s", type=float, default=90.0,
                   help="with --isolate and --deadline-s: a child still running at deadline + this is killed")
    p.add_argument("--smoke", action="store_true", help="= --cpu --tiny")
    p.add_argument("--cpu", action="store_true", help='launch.accelerator="cpu" (the runtime on gloo)')
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-128 model at seq 64 (with --cpu: smoke)")
    p.add_argument("--plan", action="store_true", help="print the row plan as JSON and exit (no torch)")
    p.add_argument("--isolate", action="store_true",
                   help="run each variant in its own child process (no state or leaked memory carried over)")
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.smoke:
        args.cpu = args.tiny = True
    if args.tiny:
        args.seq = 64

    _import_recipec()
    if args.plan:
        print(json.dumps(row_plan(args), indent=1))
        return 0
    from recipec.runtime import train

    train._setup_logging()
    start = time.perf_counter()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # With --isolate the parent stays off the GPU (no CUDA context): the children report versions.
    info = {} if args.isolate else versions()
    if info:
        print("bench environment:", json.dumps(info), flush=True)

    results: dict[str, dict[str, Any]] = {}
    port = 29600 + os.getpid() % 1000
    for i, variant in enumerate(v.strip() for v in args.variants.split(",") if v.strip()):
        split_variant(variant)  # an unknown variant or modifier fails here, before any GPU time
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            results[variant] = {"error": "skipped (bench deadline reached)"}
            continue
        if args.isolate:
            results[variant], env = run_child(args, argv, variant, start)
            info = info or env
        else:
            results[variant] = run_one(args, variant, port + i)
        if args.child_json:
            Path(args.child_json).write_text(json.dumps({"env": info, "results": results}, default=str))
        else:
            (out_dir / "results.json").write_text(json.dumps({"env": info, "args": vars(args), "results": results},
                                                             indent=1, default=str))
    if args.child_json:
        return 0

    print("\nbench environment:", json.dumps(info))
    print(f"TFLOP/s: Megatron-LM formula from the compiled plan (flops_per_step), the same for every row; "
          f"MFU against the H100 dense bf16 peak {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s (fp8 rows too); "
          f"mean over steps {args.warmup + 1}..{args.steps} (first {args.warmup} discarded; runtime rows "
          f"from log windows); est. error = (peak - est.) / est.; total {time.perf_counter() - start:.0f} s\n")
    used = {m for v in results for m in split_variant(v).mods}
    for m in sorted(used):
        print(f"+{m}: {MODIFIERS[m]}")
    print(table(results), flush=True)
    print(loss_check(results), flush=True)
    skipped = {v: r["unsupported"] for v, r in results.items() if "unsupported" in r}
    if skipped:
        print("skipped (not supported here): " + "; ".join(f"{v}: {why}" for v, why in skipped.items()))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
