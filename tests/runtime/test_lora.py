"""LoRA adapters in this process (single-rank gloo, TP=PP=1) on the tiny recipe's GPTModel:
step 0 is the base model, only adapters train, and the adapters are in the checkpoint
state with their tensor-parallel axes. The multi-rank behaviour (TP=2 parity, resume,
frozen base) is in test_train_e2e.py."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")

from recipec.compiler import build

RANK, ALPHA = 4, 8.0



def _model(mcore_tp1):
    from recipec.runtime.init import keyed_init
    from recipec.runtime.model import build_model_chunks

    compiled = build("llama3_tiny", ["peft.method=lora", f"peft.lora_rank={RANK}", f"peft.lora_alpha={ALPHA}",
                                     "launch.gpus_per_node=1"])
    c = compiled.config
    chunks, _ = build_model_chunks(c, compiled.plan.padded_vocab_size, on_gpu=False)
    keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
    return c, chunks[0]


def _logits(model, tokens):
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None)


def test_step0_equals_base_and_only_adapters_train(mcore_tp1) -> None:
    from recipec.runtime.lora import apply_lora, init_adapters, parameter_counts

    c, model = _model(mcore_tp1)
    model.eval()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _logits(model, tokens)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    apply_lora([model], c)
    init_adapters([model], c.train.seed)
    with torch.no_grad():
        lora = _logits(model, tokens)
    assert torch.equal(lora, base), "B = 0 must leave the base model's output unchanged"

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter.linear_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in base_params)
    layers = c.model.num_layers
    assert len(trainable) == 2 * 4 * layers  # A and B on qkv, proj, fc1, fc2 of every layer
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    fc2 = model.decoder.layers[0].mlp.linear_fc2
    assert qkv.adapter.linear_in.weight.shape == (RANK, c.model.hidden_size)
    assert fc2.adapter.linear_out.weight.shape == (c.model.hidden_size, RANK)
    assert not qkv.adapter.linear_out.weight.detach().any()
    assert qkv.adapter.linear_in.weight.detach().abs().sum() > 0
    n_trainable, n_total = parameter_counts([model])
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())

    # The adapter is in the path, scaled by alpha / r, and the gradient reaches only A and B.
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.normal_(0, 0.02)
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    x = torch.randn(5, 1, c.model.hidden_size)
    a, b = qkv.adapter.linear_in.weight, qkv.adapter.linear_out.weight
    with torch.no_grad():
        got, _ = qkv(x)
        plain = torch.nn.functional.linear(x, qkv.weight)
        torch.testing.assert_close(got, plain + (ALPHA / RANK) * (x @ a.T @ b.T), atol=1e-5, rtol=1e-5)


def test_adapters_are_checkpoint_shards_with_their_tp_axis(mcore_tp1) -> None:
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )
    from recipec.runtime.lora import apply_lora

    c, model = _model(mcore_tp1)
    apply_lora([model], c)
    sd = model.sharded_state_dict()
    state_keys = set(model.state_dict())
    adapter = {k: v for k, v in sd.items() if ".adapter." in k}
    assert len(adapter) == 2 * 4 * c.model.num_layers and set(adapter) <= state_keys
    qkv_b = adapter["decoder.layers.1.self_attention.linear_qkv.adapter.linear_out.weight"]
    # Layers stack on a prepended axis (global layer number), as Megatron saves the base weights.
    assert isinstance(qkv_b, ShardedTensor) and qkv_b.key == "decoder.layers.self_attention.linear_qkv.adapter.linear_out.weight"
    assert qkv_b.prepend_axis_num == 1 and qkv_b.global_offset[0] == 1
    assert qkv_b.global_shape[1:] == qkv_b.local_shape  # TP=1: the one shard is everything
    # The gated fc1's B is saved as gate/up halves, like the fc1 weight itself.
    assert isinstance(adapter["decoder.layers.0.mlp.linear_fc1.adapter.linear_out.weight"], ShardedTensorFactory)
    # The base weights keep their keys: a base checkpoint and a LoRA checkpoint share them.
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in sd
