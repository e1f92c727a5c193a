"""GPU checks of the runtime's speed paths: run on the GPU machine (`pytest tests/gpu`), skipped
elsewhere. The TE wgrad fusion must put the same gradient into Megatron's main_grad as the unfused
path (no double counting), and CUDA graphs must train the same model as eager launches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gpu_launch import require_cuda_and_te, train_one_rank  # (puts tests/launch on sys.path)
from launch_helpers import free_tcp_port

require_cuda_and_te()
import torch
from recipec.compiler import build

GPU = ['launch.accelerator="H100-80GB"', 'precision.dtype="bf16"', "launch.gpus_per_node=1",
       "~checkpoint.save", "~checkpoint.save_interval", "~checkpoint.keep_last", "~train.eval_interval"]


def _main_grads(fuse: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from megatron.core import parallel_state
    from recipec.runtime import model as runtime_model

    c = build("llama3_tiny", GPU).config
    runtime_model.TE_WGRAD_FUSION = fuse
    try:
        runtime_model.init_model_parallel(c)
        chunks, backend = runtime_model.build_model_chunks(c, c.model.padded_vocab_size(1), on_gpu=True)
        assert backend == "transformer_engine"
        ddp = runtime_model.wrap_ddp(c, chunks)[0]
        generator = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, 257, (4, c.model.seq_length), device="cuda", generator=generator)
        positions = torch.arange(c.model.seq_length, device="cuda").expand_as(tokens)
        ddp.zero_grad_buffer()
        ddp(tokens, positions, None, labels=tokens).float().mean().backward()
        torch.cuda.synchronize()
        named = list(ddp.module.named_parameters())
        return ({n: p.detach().float().clone() for n, p in named}, {n: p.main_grad.float().clone() for n, p in named})
    finally:
        runtime_model.TE_WGRAD_FUSION = True
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def nccl_world() -> None:
    import torch.distributed as dist

    port = free_tcp_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    yield
    dist.destroy_process_group()


def test_fused_wgrad_accumulation_gives_the_unfused_main_grad(nccl_world: None) -> None:
    weights_fused, fused = _main_grads(fuse=True)
    weights_plain, plain = _main_grads(fuse=False)
    assert all(torch.equal(weights_fused[n], weights_plain[n]) for n in weights_fused), "same init"
    te_linears = [n for n in fused if n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                                   "linear_fc2.weight"))]
    assert len(te_linears) == 4 * 4
    for name in fused:
        a, b = fused[name], plain[name]
        assert b.norm() > 0, name
        ratio = (a.norm() / b.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        # fused accumulates the wgrad GEMM in fp32, unfused rounds it to bf16 first: tiny differences,
        # never the factor 2 of a gradient counted twice or the 0 of one dropped
        assert abs(ratio - 1) < 1e-2 and cosine > 0.9999, f"{name}: norm ratio {ratio:.4f}, cosine {cosine:.6f}"


def _train(tmp: Path, name: str, *overrides: str) -> dict[int, float]:
    out = tmp / name
    compiled = build("llama3_tiny", [*GPU, "train.train_iters=24", "logging.log_interval=4",
                                     f"launch.output_dir={json.dumps(str(out))}", *overrides])
    log, losses = train_one_rank(compiled.write(tmp / f"{name}.build"), out)
    if overrides:
        assert "captured and replaying" in log, log[-4000:]
    return losses


@pytest.mark.parametrize("mode", ["layers", "full_iteration"])
def test_cuda_graphs_train_like_eager(tmp_path: Path, mode: str) -> None:
    eager = _train(tmp_path, "eager")
    graphed = _train(tmp_path, mode, f'train.cuda_graph="{mode}"')
    assert sorted(graphed) == sorted(eager) == list(range(1, 25))
    assert eager[24] < eager[1] - 1.0
    diffs = {s: abs(graphed[s] - eager[s]) for s in eager}
    assert max(diffs.values()) < 0.02, diffs
