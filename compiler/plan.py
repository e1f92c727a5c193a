"""The launch plan: everything the runtime and launcher need, derived once.

World size, data-parallel size, microbatches, tokens per step, parameter
counts, FLOPs per step, the memory estimate, the per-node torchrun command and
the environment. A plan whose memory estimate exceeds the accelerator is
refused here, with the numbers, rather than after a job queues.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import ArtifactError, Problem, ValidationError
from .estimate import (
    GIB,
    active_params,
    estimate_memory,
    flops_per_step,
    stage_params,
    total_params,
)
from .hardware import ACCELERATORS
from .rendezvous import JOIN_TIMEOUT_S
from .schema import RecipeConfig
from .shell import script_text_problem
from .tree import Tree

RUNTIME_MODULE = "recipec.runtime.train"


def world_size(c: RecipeConfig) -> int:
    return c.launch.nodes * c.launch.gpus_per_node


@attrs.frozen
class BatchLayout:
    """How one step's global batch splits over the ranks: the one place both halves do this
    arithmetic (validate.py checks it divides, the plan records it, runtime/data.py slices by it)."""

    world_size: int
    data_parallel_size: int  # 0 when the world does not divide by the model-parallel size
    global_batch_size: int
    micro_batch_size: int

    @property
    def fits(self) -> bool:
        """The world divides into model-parallel groups and the global batch into microbatches."""
        return self.data_parallel_size > 0 and not self.global_batch_size % self.samples_per_microbatch_round

    @property
    def samples_per_microbatch_round(self) -> int:
        """Samples one microbatch takes over all data-parallel ranks (micro x DP)."""
        return self.micro_batch_size * self.data_parallel_size

    @property
    def microbatches_per_step(self) -> int:
        return self.global_batch_size // self.samples_per_microbatch_round if self.data_parallel_size else 0

    @property
    def samples_per_rank(self) -> int:
        return self.global_batch_size // self.data_parallel_size if self.data_parallel_size else 0

    def rank_samples(self, step: int, rank: int) -> range:
        """Global sample indices data-parallel `rank` reads at `step` (before wrapping at the dataset's end):
        step k reads the same samples whether or not the run resumed in between."""
        start = step * self.global_batch_size + rank * self.samples_per_rank
        return range(start, start + self.samples_per_rank)


def batch_layout(c: RecipeConfig) -> BatchLayout:
    """World size, data-parallel size and microbatches of `c` (see BatchLayout)."""
    world, mp = world_size(c), c.parallel.model_parallel_size
    return BatchLayout(world_size=world, data_parallel_size=0 if world % mp else world // mp,
                       global_batch_size=c.train.global_batch_size, micro_batch_size=c.train.micro_batch_size)


@attrs.frozen
class Plan:
    world_size: int
    data_parallel_size: int
    microbatches_per_step: int
    tokens_per_step: int
    padded_vocab_size: int
    params_total: int
    params_active: int
    params_per_stage: tuple[int, ...]
    flops_per_step: int
    memory_gib: dict[str, float]
    accelerator: str
    peak_tflops: float
    node_commands: tuple[tuple[str, ...], ...]
    env: dict[str, str]

    def command_line(self, node_rank: int = 0) -> str:
        return shlex.join(self.node_commands[min(node_rank, len(self.node_commands) - 1)])


def performance_env(c: RecipeConfig) -> dict[str, str]:
    """Environment every rank gets; derived from the layout, then the recipe's own launch.env."""
    env: dict[str, str] = {"OMP_NUM_THREADS": "1" if c.launch.accelerator != "cpu" else str(max(1, 2 // c.launch.gpus_per_node))}
    if c.launch.accelerator != "cpu":
        env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
        env["NCCL_NVLS_ENABLE"] = "0"
        p = c.parallel
        if p.tensor_model_parallel_size > 1 or p.context_parallel_size > 1:
            # Orders TP/CP communication kernels before the compute they overlap with.
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        if c.precision.fp8:
            env["NVTE_FUSED_ATTN"] = "1"
    env.update(c.launch.env)
    return dict(sorted(env.items()))


def torchrun_command(c: RecipeConfig, artifact: str, node_rank: str | int) -> tuple[str, ...]:
    launch = c.launch
    # One node: torchrun's standalone store on a port the kernel picks (nothing to collide with);
    # several: node 0's address and port, with the join timeout written out (see rendezvous.py).
    rendezvous = ("--standalone",) if launch.nodes == 1 else (
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={launch.master_addr}:{launch.master_port}",
        f"--rdzv-id={c.name}",
        f"--rdzv-conf=join_timeout={JOIN_TIMEOUT_S}",
    )
    return (
        "torchrun",
        f"--nnodes={launch.nodes}",
        f"--nproc-per-node={launch.gpus_per_node}",
        f"--node-rank={node_rank}",
        *rendezvous,
        f"--max-restarts={launch.max_restarts}",
        "-m", RUNTIME_MODULE,
        "--artifact", artifact,
    )


def make_plan(c: RecipeConfig, tree: Tree, artifact: str) -> Plan:
    """The plan for a derived, validated config (validate() has reported the launch rules with the
    others); raises if the build directory cannot reach a script or the memory estimate does not fit."""
    problem = script_text_problem(artifact)
    if problem:
        raise ValidationError([Problem(ValidationError, f"the build directory {artifact!r} {problem}",
                                       hint="choose another directory with -o")])
    p, t = c.parallel, c.train
    batch = batch_layout(c)
    world, dp, microbatches = batch.world_size, batch.data_parallel_size, batch.microbatches_per_step
    vocab = c.model.padded_vocab_size(p.tensor_model_parallel_size)
    memory = estimate_memory(c, vocab, dp, microbatches)
    accelerator = ACCELERATORS[c.launch.accelerator]
    if accelerator.memory_gib and memory.total / GIB > accelerator.memory_gib:
        gib = memory.as_gib()
        breakdown = ", ".join(f"{k} {v}" for k, v in gib.items() if k != "total")
        raise ValidationError([Problem(
            ValidationError,
            f"estimated memory per GPU {gib['total']} GiB exceeds the {accelerator.name}'s "
            f"{accelerator.memory_gib} GiB ({breakdown}) at world size {world} "
            f"(TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
            f"CP {p.context_parallel_size} x DP {dp})",
            key="launch.nodes", source=tree.source(("launch", "nodes")),
            hint="add nodes, raise pipeline/tensor parallelism, enable the distributed optimizer or "
                 "model.recompute_granularity=\"full\"",
        )])
    nodes = range(c.launch.nodes) if c.launch.nodes <= 2 else (0,)
    commands = tuple(torchrun_command(c, artifact, rank if c.launch.nodes <= 2 else "$NODE_RANK") for rank in nodes)
    peak = accelerator.peak_tflops_fp8 if c.precision.fp8 else accelerator.peak_tflops_bf16
    return Plan(
        world_size=world,
        data_parallel_size=dp,
        microbatches_per_step=microbatches,
        tokens_per_step=t.global_batch_size * c.model.seq_length,
        padded_vocab_size=vocab,
        params_total=total_params(c.model, vocab),
        params_active=active_params(c.model, vocab),
        params_per_stage=tuple(stage_params(c, vocab)),
        flops_per_step=flops_per_step(c, vocab),
        memory_gib=memory.as_gib(),
        accelerator=accelerator.name,
        peak_tflops=peak,
        node_commands=commands,
        env=performance_env(c),
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return attrs.asdict(plan, value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)


_FIELD_NAMES = frozenset(f.name for f in attrs.fields(Plan))
_POSITIVE_INTS = ("world_size", "data_parallel_size", "microbatches_per_step", "tokens_per_step",
                  "padded_vocab_size", "params_total", "params_active", "flops_per_step")


def plan_from_dict(data: Mapping[str, Any], where: str) -> Plan:
    """The Plan that plan_to_dict wrote, read back (the runtime's one reader, runtime/artifact.py, calls
    this); a field missing or of another type than the compiler writes is an ArtifactError naming
    `where` (the plan.json path) and saying to rebuild. bool is not an int here, NaN is no number."""

    def bad(key: str) -> ArtifactError:
        what = "a positive int" if key in _POSITIVE_INTS else f"the {key} `recipec build` writes"
        return ArtifactError(f"{where}: plan.{key} = {data.get(key)!r} is not what `recipec build` writes "
                             f"({what}); rebuild it with `recipec build`")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def strings(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    for key in _POSITIVE_INTS:
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(key)
    checks = {
        "peak_tflops": number,
        "accelerator": lambda v: isinstance(v, str),
        "params_per_stage": lambda v: isinstance(v, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool)
                                                                  for n in v),
        "memory_gib": lambda v: isinstance(v, dict) and all(number(n) for n in v.values()),
        "node_commands": lambda v: isinstance(v, (list, tuple)) and bool(v) and all(strings(cmd) for cmd in v),
        "env": lambda v: isinstance(v, dict) and all(isinstance(n, str) for n in v.values()),
    }
    for key, ok in checks.items():
        if not ok(data.get(key)):
            raise bad(key)
    unknown = sorted(set(data) - _FIELD_NAMES)
    if unknown:
        raise ArtifactError(f"{where}: plan has field(s) {', '.join(unknown)} this recipec does not write; "
                            "rebuild it with `recipec build`")
    return Plan(**{**{k: data[k] for k in _FIELD_NAMES},
                   "peak_tflops": float(data["peak_tflops"]),
                   "params_per_stage": tuple(data["params_per_stage"]),
                   "node_commands": tuple(tuple(cmd) for cmd in data["node_commands"]),
                   "memory_gib": dict(data["memory_gib"]), "env": dict(data["env"])})
