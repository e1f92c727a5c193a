"""DoRA (`peft.method = "dora"`): LoRA plus a trained magnitude per output row,
W' = m * (W + s B A) / ||W + s B A||_row (PEFT's definition: the norm over each output row's inputs).

In this process (single-rank gloo, TP=1) on the tiny recipe's GPTModel: step 0 is the base model,
each adapted linear computes the decomposed weight (a bias stays unscaled), only A, B and m train,
and m is in the checkpoint state with its TP axis. Through `recipec launch` (real torchrun): a
DoRA run's loss falls with the base frozen, and TP=2 gives TP=1's losses (the row-parallel norm
is all-reduced over TP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")

from recipec.compiler import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, recipec_cmd

RANK, ALPHA = 4, 8.0
DORA = ["peft.method=dora", f"peft.lora_rank={RANK}", f"peft.lora_alpha={ALPHA}"]


def _model(*overrides: str):
    from recipec.runtime.init import keyed_init
    from recipec.runtime.model import build_model_chunks

    compiled = build("llama3_tiny", [*DORA, "launch.gpus_per_node=1", *overrides])
    c = compiled.config
    chunks, _ = build_model_chunks(c, compiled.plan.padded_vocab_size, on_gpu=False)
    keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
    return c, chunks[0]


def _logits(model, tokens):
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None)


def _decomposed(linear) -> torch.Tensor:
    """The weight a DoRA linear stands for, computed densely here (TP=1: local = global)."""
    a, b, m = (linear.adapter.linear_in.weight, linear.adapter.linear_out.weight, linear.adapter.weight_magnitude)
    v = linear.weight + (ALPHA / RANK) * b @ a
    return m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def test_dora_step0_is_base_then_layers_compute_the_decomposed_weight(mcore_tp1) -> None:
    from recipec.runtime.lora import apply_lora, init_adapters

    c, model = _model("model.add_qkv_bias=true")
    model.eval()
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    with torch.no_grad():
        qkv.bias.normal_(0, 0.1)  # a bias the base adds into its output: DoRA must leave it unscaled
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _logits(model, tokens)
    apply_lora([model], c)
    init_adapters([model], c.train.seed)
    with torch.no_grad():
        assert torch.equal(_logits(model, tokens), base), "B = 0 and m = ||W|| must give the base model's output"

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 4 * c.model.num_layers  # A, B, m on qkv, proj, fc1, fc2 of every layer
    assert all(n.endswith(("adapter.linear_in.weight", "adapter.linear_out.weight", "adapter.weight_magnitude"))
               for n in trainable)
    fc1 = model.decoder.layers[1].mlp.linear_fc1
    fc2 = model.decoder.layers[1].mlp.linear_fc2
    # m starts at the row norms of W: one per output row (the gated fc1: gate rows then up rows).
    torch.testing.assert_close(qkv.adapter.weight_magnitude, torch.linalg.vector_norm(qkv.weight, dim=1))
    assert fc1.adapter.weight_magnitude.shape == (2 * c.model.ffn_hidden_size,)
    assert fc2.adapter.weight_magnitude.shape == (c.model.hidden_size,)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.normal_(0, 0.05)
            elif name.endswith("adapter.weight_magnitude"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    x = torch.randn(5, 2, c.model.hidden_size)
    with torch.no_grad():
        got, _ = qkv(x)
        torch.testing.assert_close(got, x @ _decomposed(qkv).T + qkv.bias, atol=1e-5, rtol=1e-5)
        got, _ = fc1(x)
        torch.testing.assert_close(got, x @ _decomposed(fc1).T, atol=1e-5, rtol=1e-5)
        h = torch.randn(5, 2, c.model.ffn_hidden_size)
        got, _ = fc2(h)
        torch.testing.assert_close(got, h @ _decomposed(fc2).T, atol=1e-5, rtol=1e-5)

    # Gradients reach A, B and m only (the norm is a constant of the graph, as in PEFT).
    model.train()
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model(tokens, position_ids, None, labels=labels).float().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert qkv.adapter.weight_magnitude.grad.abs().sum() > 0


def test_magnitude_is_a_checkpoint_shard_with_its_tp_axis(mcore_tp1) -> None:
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )
    from recipec.runtime.lora import apply_lora

    c, model = _model()
    apply_lora([model], c)
    sd = model.sharded_state_dict()
    mags = {k: v for k, v in sd.items() if k.endswith(".adapter.weight_magnitude")}
    assert len(mags) == 4 * c.model.num_layers and set(mags) <= set(model.state_dict())
    qkv = mags["decoder.layers.1.self_attention.linear_qkv.adapter.weight_magnitude"]
    assert isinstance(qkv, ShardedTensor) and qkv.key == "decoder.layers.self_attention.linear_qkv.adapter.weight_magnitude"
    assert qkv.prepend_axis_num == 1 and qkv.global_offset[0] == 1
    # Column-parallel: sharded over TP with the output rows (axis 0 after the layer axis).
    assert qkv.axis_fragmentations[1] == 1 and qkv.global_shape[1:] == qkv.local_shape
    # The gated fc1's m is saved as gate/up halves, like its weight and B.
    assert isinstance(mags["decoder.layers.0.mlp.linear_fc1.adapter.weight_magnitude"], ShardedTensorFactory)
    proj = mags["decoder.layers.0.self_attention.linear_proj.adapter.weight_magnitude"]
    assert isinstance(proj, ShardedTensor) and proj.global_shape[1:] == (c.model.hidden_size,)


# ---------------------------------------------------------------- through `recipec launch`
COMMON = ["scheduler.lr_decay_iters=8", "logging.log_interval=1", "train.eval_interval=100", "train.eval_iters=1",
          "checkpoint.save_interval=8", "optimizer.lr=1e-2", "model.seq_length=64", "train.global_batch_size=8",
          "train.micro_batch_size=4", *DORA]


def _launch(root: Path, name: str, nproc: int, *overrides: str) -> tuple[dict[int, float], Path, str]:
    run = root / name
    run.mkdir(parents=True)
    argv = recipec_cmd("launch", "llama3_tiny", f"launch.gpus_per_node={nproc}", *COMMON,
                       f"launch.output_dir={run / 'out'}", f"checkpoint.save={run / 'ckpt'}", *overrides,
                       "-o", str(run / "build"))
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(argv, cwd=run, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    records = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, run / "ckpt", output


@pytest.fixture(scope="module")
def dora_tp1(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], Path, str]:
    return _launch(tmp_path_factory.mktemp("dora"), "tp1", 1, "train.train_iters=8")


def _tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata) and k.startswith(("embedding", "decoder", "output_layer"))}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def test_dora_run_trains_the_adapters_and_magnitudes(dora_tp1) -> None:
    losses, ckpt, output = dora_tp1
    assert "DoRA: a trained magnitude vector on each of the 16 adapted linear(s)" in output
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (6, 7, 8)) / 3 < losses[1] - 0.2, losses
    saved = _tensors(ckpt / "iter_0000008")
    mags = {k: v for k, v in saved.items() if k.endswith("adapter.weight_magnitude")}
    assert len(mags) == 4
    # m started at ||W||_row of the frozen W (unchanged in the checkpoint) and then trained.
    qkv_w = saved["decoder.layers.self_attention.linear_qkv.weight"]
    start = torch.linalg.vector_norm(qkv_w, dim=-1)
    moved = (mags["decoder.layers.self_attention.linear_qkv.adapter.weight_magnitude"] - start).abs().max()
    assert 0 < moved.item() < 1


def test_dora_tensor_parallel_matches_single_rank(tmp_path: Path, dora_tp1) -> None:
    losses, ckpt, _ = _launch(tmp_path, "tp2", 2, "train.train_iters=5", "parallel.tensor_model_parallel_size=2")
    diffs = {s: abs(losses[s] - dora_tp1[0][s]) for s in range(1, 6)}
    assert max(diffs.values()) <= 1e-5, f"DoRA TP=2 vs TP=1: |diff| per step {diffs}"
    # Both runs start from the same keyed init; after 5 and 8 steps the frozen base weights are still it.
    at5, at8 = _tensors(ckpt / "iter_0000005"), _tensors(dora_tp1[1] / "iter_0000008")
    base = [k for k in at8 if ".adapter." not in k]
    assert base and set(at5) == set(at8)
    assert all(torch.equal(at5[k], at8[k]) for k in base)
    assert not all(torch.equal(at5[k], at8[k]) for k in at8 if k.endswith("adapter.weight_magnitude"))


def test_dora_step0_is_base_under_bf16_too(mcore_tp1) -> None:
    """m is kept in the parameter dtype: the norm it is divided by is rounded alike, so m / ||W|| is exactly 1."""
    from recipec.runtime.lora import apply_lora

    c, model = _model("precision.dtype=bf16")
    model.eval()
    tokens = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = _logits(model, tokens)
        apply_lora([model], c)
        assert model.decoder.layers[0].mlp.linear_fc2.adapter.weight_magnitude.dtype == torch.bfloat16
        assert torch.equal(_logits(model, tokens), base)
