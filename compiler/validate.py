"""Cross-field rules: values that are each fine but cannot run together.

Each rule is one small function returning problems (errors) and notes
(warnings); every message shows the arithmetic that failed, because these are
the errors that otherwise surface only after a job has queued.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import attrs

from .errors import Problem, ValidationError
from .executors import rules as launch_rules
from .families import check as family_rules
from .modes import rules as mode_rules
from .plan import batch_layout, world_size
from .schema import RecipeConfig
from .schema.launch import env_key_display
from .text import shown
from .tree import Tree

Finding = tuple[str, str, str | None]  # (dotted key, message, hint)
Rule = Callable[[RecipeConfig], Iterator[Finding]]


@attrs.frozen
class Findings:
    errors: tuple[Problem, ...]
    warnings: tuple[str, ...]


def family(c: RecipeConfig) -> Iterator[Finding]:
    """model.architecture names a known family (compiler/families), and that family's own rules."""
    yield from family_rules(c.model)


def _world(c: RecipeConfig) -> str:
    return f"world size {world_size(c)} (nodes {c.launch.nodes} x gpus_per_node {c.launch.gpus_per_node})"


def layout(c: RecipeConfig) -> Iterator[Finding]:
    p = c.parallel
    mp = p.model_parallel_size
    if world_size(c) % mp:
        yield ("parallel.tensor_model_parallel_size",
               (f"{_world(c)} is not divisible by tensor {p.tensor_model_parallel_size} x pipeline "
               f"{p.pipeline_model_parallel_size} x context {p.context_parallel_size} = {mp}"),
               f"use a world size that is a multiple of {mp}, or shrink the model-parallel layout")
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    expert_mp = etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    if (c.model.is_moe or p.expert_model_parallel_size > 1) and not world_size(c) % mp and world_size(c) % expert_mp:
        yield ("parallel.expert_model_parallel_size",
               (f"{_world(c)} is not divisible by expert_tensor {etp} x expert {p.expert_model_parallel_size} "
               f"x pipeline {p.pipeline_model_parallel_size} = {expert_mp}"), None)
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        yield ("parallel.sequence_parallel", "sequence_parallel needs tensor_model_parallel_size > 1 (it is 1)",
               "set parallel.sequence_parallel=false or raise tensor_model_parallel_size")
    elif p.sequence_parallel and c.launch.accelerator == "cpu":
        # On CPU the runtime builds Megatron-Core's local modules, whose torch LayerNorm asserts
        # against sequence parallelism (a traceback per rank). GPU runs are checked at launch
        # (preflight.py), where it is known whether Transformer Engine or Apex is installed.
        yield ("parallel.sequence_parallel", ("sequence parallelism needs Transformer Engine's (or Apex's) layer "
               'norms, which do not run on CPU (launch.accelerator is "cpu")'), "set parallel.sequence_parallel=false")


def heads(c: RecipeConfig) -> Iterator[Finding]:
    m, tp = c.model, c.parallel.tensor_model_parallel_size
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        yield ("model.hidden_size", (f"hidden_size {m.hidden_size} is not divisible by num_attention_heads "
               f"{m.num_attention_heads}, so kv_channels cannot be derived"), "set model.kv_channels explicitly")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        yield ("model.num_query_groups", (f"num_attention_heads {m.num_attention_heads} is not divisible by "
               f"num_query_groups {groups}"), None)
    if m.num_attention_heads % tp:
        yield ("model.num_attention_heads", (f"num_attention_heads {m.num_attention_heads} is not divisible by "
               f"tensor_model_parallel_size {tp}"), None)
    if groups % tp:
        yield ("model.num_query_groups", (f"num_query_groups {groups} is not divisible by "
               f"tensor_model_parallel_size {tp}"), f"use tensor_model_parallel_size <= {groups} that divides it")


def layers(c: RecipeConfig) -> Iterator[Finding]:
    m, p = c.model, c.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if m.num_layers % pp:
        yield ("parallel.pipeline_model_parallel_size",
               f"num_layers {m.num_layers} is not divisible by pipeline {pp}", None)
    if vpp is not None:
        if pp == 1:
            yield ("parallel.virtual_pipeline_model_parallel_size",
                   "virtual pipeline stages need pipeline_model_parallel_size > 1", None)
        elif m.num_layers % (pp * vpp):
            yield ("parallel.virtual_pipeline_model_parallel_size",
                   f"num_layers {m.num_layers} is not divisible by pipeline {pp} x virtual {vpp} = {pp * vpp}", None)


def sequence(c: RecipeConfig) -> Iterator[Finding]:
    m, p = c.model, c.parallel
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    if cp > 1 and m.seq_length % (2 * cp):
        yield ("model.seq_length", (f"seq_length {m.seq_length} is not divisible by 2 x context {cp} = {2 * cp} "
               "(context parallelism splits each sequence into 2 x CP load-balanced chunks)"), None)
    if p.sequence_parallel and (m.seq_length // cp) % tp:
        yield ("model.seq_length", (f"seq_length {m.seq_length} / context {cp} is not divisible by tensor {tp} "
               "(sequence parallel splits the sequence over TP ranks)"), None)


def batches(c: RecipeConfig) -> Iterator[Finding]:
    t, b = c.train, batch_layout(c)
    if not b.data_parallel_size:
        return  # layout() reports the world that does not divide
    dp, round_ = b.data_parallel_size, b.samples_per_microbatch_round
    if not b.fits:
        yield ("train.global_batch_size",
               (f"global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
               f"{t.micro_batch_size} x data-parallel {dp} = {round_}"),
               f"use a multiple of {round_}")
        return
    vpp = c.parallel.virtual_pipeline_model_parallel_size
    microbatches = b.microbatches_per_step
    pp = c.parallel.pipeline_model_parallel_size
    if vpp and pp > 1 and microbatches % pp:
        yield ("train.global_batch_size", (f"the interleaved schedule needs microbatches {microbatches} "
               f"(global {t.global_batch_size} / (micro {t.micro_batch_size} x DP {dp})) to be a multiple of "
               f"pipeline {pp}"), None)


def experts(c: RecipeConfig) -> Iterator[Finding]:
    m, p = c.model, c.parallel
    ep = p.expert_model_parallel_size
    if not m.is_moe:
        if ep > 1:
            yield ("parallel.expert_model_parallel_size", (f"expert_model_parallel_size {ep} needs an MoE model "
                   "(model.num_moe_experts is unset)"), None)
        return
    assert m.num_moe_experts is not None
    if m.num_moe_experts % ep:
        yield ("model.num_moe_experts", (f"num_moe_experts {m.num_moe_experts} is not divisible by "
               f"expert_model_parallel_size {ep}"), None)
    if m.moe_router_topk > m.num_moe_experts:
        yield ("model.moe_router_topk", (f"moe_router_topk {m.moe_router_topk} exceeds num_moe_experts "
               f"{m.num_moe_experts}"), None)
    if ep > 1 and m.moe_token_dispatcher_type == "alltoall" and c.launch.accelerator == "cpu":
        yield ("model.moe_token_dispatcher_type", ("the alltoall token dispatcher needs NCCL; on CPU (gloo) "
               f"expert parallelism ({ep}) works with the allgather dispatcher"),
               'set model.moe_token_dispatcher_type="allgather"')
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        yield ("parallel.sequence_parallel", ("MoE with tensor parallelism needs sequence_parallel = true "
               "(Megatron-Core's token dispatcher requires it)"), "set parallel.sequence_parallel=true")


def schedule(c: RecipeConfig) -> Iterator[Finding]:
    o, s, t = c.optimizer, c.scheduler, c.train
    if o.min_lr > o.lr:
        yield ("optimizer.min_lr", f"min_lr {o.min_lr} is above lr {o.lr}", None)
    decay = s.lr_decay_iters or t.train_iters
    if (s.lr_warmup_iters is not None and s.lr_warmup_fraction is not None
            and s.lr_warmup_iters != int(s.lr_warmup_fraction * decay)):  # equal: an already derived config
        yield ("scheduler.lr_warmup_fraction", (f"set lr_warmup_iters or lr_warmup_fraction, not both (lr_warmup_iters "
               f"{s.lr_warmup_iters} != lr_warmup_fraction {s.lr_warmup_fraction} x lr_decay_iters {decay})"),
               "unset one of them with ~scheduler.lr_warmup_iters or ~scheduler.lr_warmup_fraction")
    elif s.lr_warmup_iters is not None and s.lr_warmup_iters >= min(decay, t.train_iters) and t.train_iters > 1:
        yield ("scheduler.lr_warmup_iters", (f"lr_warmup_iters {s.lr_warmup_iters} >= "
               f"{'lr_decay_iters' if decay < t.train_iters else 'train_iters'} {min(decay, t.train_iters)}: "
               f"the run never reaches the peak lr {o.lr} (Megatron requires warmup < decay)"),
               "lower scheduler.lr_warmup_iters, or use scheduler.lr_warmup_fraction (e.g. 0.01)")
    if s.lr_decay_style == "WSD" and s.lr_wsd_decay_iters is None:
        yield ("scheduler.lr_wsd_decay_iters", "lr_decay_style WSD needs lr_wsd_decay_iters", None)


def io(c: RecipeConfig) -> Iterator[Finding]:
    d, tok, ck, pr = c.data, c.tokenizer, c.checkpoint, c.profiling
    if d.kind != "mock" and not d.paths:
        yield ("data.paths", f"data.kind {d.kind!r} needs data.paths", 'e.g. data.paths=["/data/my_corpus_text_document"]')
    if d.weights and len(d.weights) != len(d.paths):
        yield ("data.weights", f"{len(d.weights)} weights for {len(d.paths)} paths", "give one weight per path")
    parts = d.split.split(",")
    if len(parts) != 3 or not all(x.strip().replace(".", "", 1).isdigit() for x in parts):
        yield ("data.split", f"split {d.split!r} is not three comma-separated numbers", 'e.g. "969,30,1"')
    if tok.type == "huggingface" and not tok.path:
        yield ("tokenizer.path", "a huggingface tokenizer needs tokenizer.path (a local directory)", None)
    if d.kind in ("text", "sft") and tok.type == "null":
        yield ("tokenizer.type", f"data.kind {d.kind!r} holds text and needs a real tokenizer",
               'set tokenizer.type="byte" or "huggingface"')
    if d.kind == "sft":
        others = [p for p in d.paths if not p.endswith(".jsonl")]
        if others:
            yield ("data.paths", (f"data.kind 'sft' reads jsonl files (one prompt/response or messages record "
                   f"per line), and {others[0]!r} does not end in .jsonl"),
                   "name the files *.jsonl, or use data.kind=\"text\" for plain text")
        if d.weights:
            yield ("data.weights", "data.kind 'sft' concatenates its files; blend weights are not supported",
                   "unset them with ~data.weights (repeat a file in data.paths to give it more weight)")
    if tok.type == "byte" and c.model.vocab_size < 257:
        yield ("model.vocab_size", f"the byte tokenizer needs vocab_size >= 257 (256 bytes + end of text), got {c.model.vocab_size}", None)
    if (ck.save_interval or ck.keep_last) and not ck.save:
        yield ("checkpoint.save", "save_interval/keep_last are set but checkpoint.save is not", None)
    if pr.profile_step_start >= pr.profile_step_end:
        yield ("profiling.profile_step_end", (f"profile_step_end {pr.profile_step_end} must be after "
               f"profile_step_start {pr.profile_step_start}"), None)


_LOW_PRECISION_OPTIMIZER = ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")


def _precision_aware_optimizer(c: RecipeConfig) -> Iterator[Finding]:
    """Megatron-Core's precision-aware optimizer runs only in Transformer Engine's FusedAdam (CUDA),
    as the distributed optimizer's Adam; without it Megatron asserts at run time (its checks, here)."""
    o = c.optimizer
    key = "optimizer.use_precision_aware_optimizer"
    if not o.use_precision_aware_optimizer:
        for name in (k for k in _LOW_PRECISION_OPTIMIZER if getattr(o, k) != "fp32"):
            yield (f"optimizer.{name}",
                   f"optimizer.{name}={getattr(o, name)!r} takes effect only with the precision-aware optimizer",
                   f"set {key}=true, or unset optimizer.{name} (fp32)")
        return
    needs = f"{key} needs Transformer Engine's FusedAdam"
    off = f"{key}=false"
    if c.model.transformer_impl == "local":
        yield (key, f'{needs}, but model.transformer_impl is "local"',
               f'set model.transformer_impl="auto" (or "transformer_engine"), or {off}')
    if c.launch.accelerator == "cpu":
        yield (key, f"{needs} (CUDA), but launch.accelerator is cpu", f"set {off}")
    if o.optimizer != "adam":
        yield (key, f"the precision-aware optimizer is an Adam; optimizer.optimizer is {o.optimizer!r}",
               'set optimizer.optimizer="adam"')
    if not o.use_distributed_optimizer:
        yield (key, _NOT_DISTRIBUTED, "set optimizer.use_distributed_optimizer=true")
    if o.main_grads_dtype == "bf16" and c.precision.grad_reduce_in_fp32:
        yield ("optimizer.main_grads_dtype", _BF16_GRADS,
               'set precision.grad_reduce_in_fp32=false, or optimizer.main_grads_dtype="fp32"')


_NOT_DISTRIBUTED = ("the precision-aware optimizer runs inside the distributed optimizer, and "
                    "optimizer.use_distributed_optimizer is false")
_BF16_GRADS = ('optimizer.main_grads_dtype="bf16", but precision.grad_reduce_in_fp32 is true (gradients '
               "accumulate in fp32)")


def precision(c: RecipeConfig) -> Iterator[Finding]:
    yield from _precision_aware_optimizer(c)
    if c.precision.fp8 and c.precision.dtype == "fp32":
        yield ("precision.fp8", "FP8 needs a bf16 or fp16 compute dtype, not fp32", 'set precision.dtype="bf16"')
    if c.peft.method:
        valid = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
        for target in c.peft.target_modules:
            if target not in valid:
                yield ("peft.target_modules", f"unknown LoRA target {target!r}", f"choose from {sorted(valid)}")


def kernels(c: RecipeConfig) -> Iterator[Finding]:
    """Layer implementation, torch.compile and CUDA graphs: the combinations that cannot run."""
    impl, t = c.model.transformer_impl, c.train
    if c.precision.fp8 and impl == "local":
        yield ("model.transformer_impl", (f"precision.fp8={c.precision.fp8!r} needs Transformer Engine modules, "
               'but model.transformer_impl is "local"'), 'set model.transformer_impl="auto" or unset precision.fp8')
    if t.torch_compile and impl == "transformer_engine":
        yield ("train.torch_compile", ("torch.compile runs on Megatron-Core's local modules only (Transformer "
               'Engine modules are opaque to it), but model.transformer_impl is "transformer_engine"'),
               'set model.transformer_impl="local" (or "auto"), or train.torch_compile=false')
    if t.torch_compile and c.precision.fp8:
        yield ("train.torch_compile", "torch.compile runs on the local modules, which have no FP8",
               "unset precision.fp8 or set train.torch_compile=false")
    if t.cuda_graph == "none":
        return
    if c.launch.accelerator == "cpu":
        yield ("train.cuda_graph", f"train.cuda_graph={t.cuda_graph!r} needs a GPU; launch.accelerator is cpu",
               'set train.cuda_graph="none"')
    if t.torch_compile:
        yield ("train.cuda_graph", "train.cuda_graph and train.torch_compile cannot be combined here",
               'keep one: train.cuda_graph="none" or train.torch_compile=false')
    if t.cuda_graph == "layers" and c.model.recompute_granularity == "full":
        yield ("train.cuda_graph", ('per-layer CUDA graphs cannot replay full activation recompute (Megatron-Core '
               'supports it only inside a full-iteration graph)'),
               'set train.cuda_graph="full_iteration", or model.recompute_granularity="selective"')
    if t.cuda_graph == "full_iteration" and t.check_for_nan_in_grad:
        yield ("train.check_for_nan_in_grad", ("the DDP NaN check reads every gradient bucket on the host, which "
               'a captured full-iteration graph cannot do'), ("set train.check_for_nan_in_grad=false (the runtime still "
               "stops on a non-finite gradient norm)"))


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


MAX_NAME = 128  # a file name is at most 255 bytes; build/<name> and runs/<name> add suffixes


def naming(c: RecipeConfig) -> Iterator[Finding]:
    if not _NAME.fullmatch(c.name) or c.name in (".", ".."):
        yield ("name", (f"name {shown(repr(c.name))} cannot be used: it names the build and run directories "
               "(build/<name>, runs/<name>) and the rendezvous id"),
               "use letters, digits, _ . + - (no spaces or slashes), e.g. name = \"my_llama\"")
    elif len(c.name) > MAX_NAME:
        yield ("name", (f"name is {len(c.name)} characters long; it names directories (build/<name>, runs/<name>), "
               f"so at most {MAX_NAME}"), "use a short name, e.g. name = \"my_llama\"")


RULES: tuple[Rule, ...] = (naming, family, layout, heads, layers, sequence, batches, experts, schedule, io, precision,
                          kernels, mode_rules)  # mode_rules: the train.mode plug-in's own (compiler/modes)


def warnings_for(c: RecipeConfig) -> list[str]:
    notes = []
    if c.precision.fp8:
        notes.append(f"precision.fp8={c.precision.fp8!r} needs Transformer Engine at run time; "
                     "without it the runtime stops with an error")
    if c.precision.fp8 == "mxfp8" and not c.launch.accelerator.startswith("B"):
        notes.append("mxfp8 needs Blackwell GPUs; launch.accelerator is " + c.launch.accelerator)
    if c.model.transformer_impl == "local" or c.train.torch_compile:
        notes.append("the memory estimate assumes Transformer Engine's fused layers; Megatron-Core's local modules "
                     "measured 10% (torch.compile) to 29% (eager) above it on an H100 (bench/RESULTS.md)")
    if c.scheduler.lr_decay_iters and c.scheduler.lr_decay_iters > c.train.train_iters:
        notes.append(f"lr_decay_iters {c.scheduler.lr_decay_iters} > train_iters {c.train.train_iters}: "
                     "the run ends before min_lr")
    return notes


def dotted_key(path: tuple[str, ...]) -> str:
    """A tree path as a message names it; an env entry whose name is not an identifier is quoted."""
    if path[:2] == ("launch", "env") and len(path) == 3:
        return env_key_display(path[2])
    return ".".join(path)


def validate(config: RecipeConfig, tree: Tree) -> Findings:
    """Run every rule, then the launch rules (shared [launch] checks and the executor's own:
    executors.rules), so that one report holds every problem; errors point at the key's own
    file and line. A key already reported by a rule is not reported again by a launch rule."""
    errors = []
    for rule in RULES:
        for key, message, hint in rule(config):
            source = tree.source(tuple(key.split(".")))
            errors.append(Problem(ValidationError, message, key=key, source=source, hint=hint))
    reported = {p.key for p in errors}
    for path, message, hint in launch_rules(config):
        key = dotted_key(path)
        if key not in reported:
            errors.append(Problem(ValidationError, message, key=key, source=tree.source(path), hint=hint))
    return Findings(tuple(errors), tuple(warnings_for(config)))
