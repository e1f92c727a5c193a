"""Train a tiny Megatron-Core GPT on CPU/gloo under torchrun; the tests' single workhorse.

Launched by tests/runtime/test_mcore_cpu.py as
``python -m torch.distributed.run --nproc-per-node N mcore_tiny.py --tp .. --pp .. ...``.
Everything is real Megatron-Core (parallel_state, GPTModel, DDP, get_megatron_optimizer,
get_forward_backward_func, dist_checkpointing); ``runtime.device.activate_cpu_mode()``
makes it run without CUDA.  The per-step global-batch losses are written as JSON by the
rank that holds them (last pipeline stage, tp rank 0, dp rank 0) so tests can compare
layouts.  The batch is one fixed random batch, repeated every step, split over DP ranks
and micro-batches so that the *global* batch is identical for every layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from runtime.device import (  # noqa: E402
    PATCHED,
    activate_cpu_mode,
    device_for_runtime,
    prime_optimizer_state_for_load,
)  # noqa: E402

activate_cpu_mode()  # before megatron builds anything

import megatron.core  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from runtime.layer_spec import gpt_layer_spec  # noqa: E402

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, GROUPS, FFN = 256, 32, 64, 4, 4, 2, 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--init", choices=("megatron", "keyed"), default="megatron",
                   help="megatron: use_cpu_initialization master weights (TP-independent); "
                   "keyed: every global tensor drawn from a generator seeded by its checkpoint "
                   "key, sliced by Megatron's sharding metadata (TP- and PP-independent)")
    p.add_argument("--save-dir", type=Path)
    p.add_argument("--save-after", type=int, default=0, help="save after this many steps")
    p.add_argument("--load-dir", type=Path)
    p.add_argument("--no-load-optimizer", action="store_true")
    p.add_argument("--optim-sharding", default="dp_reshardable",
                   help="DistributedOptimizer metadata['distrib_optim_sharding_type']")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def build_model(args: argparse.Namespace) -> tuple[GPTModel, TransformerConfig, str]:
    """Tiny fp32 GPT for this rank's pipeline stage; dropout off so runs are deterministic."""
    spec, label = gpt_layer_spec(None, False, False, "LayerNorm")
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, ffn_hidden_size=FFN,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=True, perform_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    )
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
    )
    if args.init == "keyed":
        keyed_init(model, args.seed)
    return model, config, label


def keyed_init(model: GPTModel, seed: int) -> None:
    """Re-initialise every parameter from its *global* checkpoint tensor.

    Megatron's CPU initialisation draws full master weights in construction order, which is
    TP-independent but not PP-independent (a later stage never draws the earlier layers).
    Drawing each global tensor from a generator keyed by its sharded-state-dict key and
    slicing this rank's shard by ``global_offset`` makes weights identical in every layout.
    """
    with torch.no_grad():
        for sh in model.sharded_state_dict().values():
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(sh.key.encode()))
            if sh.key.endswith("bias"):
                full = torch.zeros(sh.global_shape)
            elif "norm" in sh.key:
                full = torch.ones(sh.global_shape)
            else:
                full = torch.randn(sh.global_shape, generator=gen) * 0.02
            index: list[Any] = list(sh.global_offset[: sh.prepend_axis_num])
            for dim, off in enumerate(sh.global_offset[sh.prepend_axis_num:]):
                index.append(slice(off, off + sh.data.shape[dim]))
            sh.data.copy_(full[tuple(index)])


def fixed_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the one fixed global batch."""
    gen = torch.Generator().manual_seed(4321)
    data = torch.randint(0, VOCAB, (args.global_batch, SEQ + 1), generator=gen)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_dp = args.global_batch // dp
    mine = data[dp_rank * per_dp:(dp_rank + 1) * per_dp]
    pos = torch.arange(SEQ).unsqueeze(0)
    return [
        {"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous(),
         "position_ids": pos.expand(mb.shape[0], SEQ)}
        for mb in mine.split(args.micro_batch)
    ]


def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean token loss of one micro-batch (the schedule divides by #micro-batches)."""
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any):
    """Schedule callback: every stage gets the batch (non-first stages ignore tokens)."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, loss_func


def train_step(args: argparse.Namespace, ddp_model: DistributedDataParallel, optimizer: Any,
               batches: list[dict[str, torch.Tensor]]) -> float | None:
    """One optimizer step through get_forward_backward_func; global mean loss or None."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp_model],
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=args.micro_batch,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    if not parallel_state.is_pipeline_last_stage():
        return None
    loss = torch.stack([x["lm loss"] for x in losses]).mean()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def checkpoint_state(model: GPTModel, optimizer: Any, args: argparse.Namespace,
                     is_loading: bool) -> dict[str, Any]:
    """Sharded state dict of model + optimizer (dist optimizer gets the sharding type)."""
    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if is_loading and args.no_load_optimizer:
        return state
    kwargs: dict[str, Any] = {"is_loading": is_loading}
    if args.distributed_optimizer:
        kwargs["metadata"] = {"distrib_optim_sharding_type": args.optim_sharding}
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, **kwargs)
    return state


def save(model: GPTModel, optimizer: Any, args: argparse.Namespace) -> None:
    """torch_dist (default backend) save of model + optimizer; all ranks participate."""
    args.save_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(checkpoint_state(model, optimizer, args, False), str(args.save_dir))


def load(model: GPTModel, optimizer: Any, args: argparse.Namespace) -> None:
    """Load into a freshly built model/optimizer (any TP/DP layout the format allows)."""
    prime_optimizer_state_for_load(optimizer)  # torch Adam has no state before step 1
    # no_grad: loading copies into leaf parameters (views of DDP buffers) in place.
    with torch.no_grad():
        state = checkpoint_state(model, optimizer, args, True)
        loaded = dist_checkpointing.load(state, str(args.load_dir))
        model.load_state_dict(loaded["model"])
        if "optimizer" in loaded:
            optimizer.load_state_dict(loaded["optimizer"])


def main() -> None:
    args = parse_args()
    dist.init_process_group(backend="gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    model, config, spec_label = build_model(args)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0,
                        use_distributed_optimizer=args.distributed_optimizer,
                        params_dtype=torch.float32),
        [ddp_model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    if args.load_dir:
        load(model, optimizer, args)
    batches = fixed_batches(args)
    losses: list[float] = []
    for step in range(args.steps):
        loss = train_step(args, ddp_model, optimizer, batches)
        if loss is not None:
            losses.append(loss)
        if args.save_dir and step + 1 == args.save_after:
            save(model, optimizer, args)
    if (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        args.out.write_text(json.dumps({
            "losses": losses, "spec": spec_label, "device": str(device_for_runtime()),
            "patches": PATCHED, "world": dist.get_world_size(),
            "megatron": megatron.core.__version__,
        }))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
