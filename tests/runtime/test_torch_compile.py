"""runtime.compile on CPU with real Megatron-Core modules (single-rank gloo, TP=PP=1): each
TransformerLayer of a tiny Llama GPTModel (the runtime's local+SDPA spec, keyed init) is
torch.compiled with inductor, and must give eager's loss and gradients, run every layer
through one compiled graph with no graph break, and leave parameter / checkpoint names alone.
The layers are compiled in place, so the TP/DP/checkpoint machinery is the one
test_mcore_cpu.py and test_train_e2e.py exercise; here only compiled-vs-eager is checked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

pytest.importorskip("megatron.core")

import torch
from recipec.compiler import build
from torch._dynamo.utils import counters

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
        "train.global_batch_size=2", "train.micro_batch_size=2", "launch.gpus_per_node=1"]


def _model(overrides: list[str]) -> torch.nn.Module:
    """The runtime's GPTModel for the tiny recipe, with layout-independent keyed init."""
    from recipec.runtime.device import activate_cpu_mode
    from recipec.runtime.init import keyed_init
    from recipec.runtime.model import build_model_chunks

    activate_cpu_mode()
    compiled = build("llama3_tiny", [*TINY, *overrides])
    c = compiled.config
    (model,) = build_model_chunks(c, compiled.plan.padded_vocab_size, on_gpu=False)[0]
    keyed_init([model], c.train.seed, c.model.init_method_std, c.model.num_layers)
    return model


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward on one fixed batch (fixed RNG, for dropout); the loss and every grad."""
    from megatron.core import tensor_parallel

    torch.manual_seed(5)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, 64)
    loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1)).float().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same_step(got: tuple[torch.Tensor, dict[str, torch.Tensor]],
                      want: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        assert grad is not None and got[1][name] is not None, name
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _names(model: torch.nn.Module) -> dict[str, Any]:
    return {"params": [(n, id(p)) for n, p in model.named_parameters()], "state": list(model.state_dict()),
            "sharded": sorted(model.sharded_state_dict()), "layers": [id(m) for m in model.decoder.layers]}


@pytest.fixture(scope="module")
def run(mcore_tp1: None) -> dict[str, Any]:
    """Eager and inductor-compiled twins (same init, same batch), one step each."""
    from recipec.runtime.compile import compile_transformer_layers

    eager, model = _model([]), _model([])
    before = _names(model)
    torch._dynamo.reset()
    counters.clear()
    count = compile_transformer_layers([model])
    compiled_step = _step(model)
    stats = {key: dict(counters[key]) for key in ("stats", "graph_break")}
    model.zero_grad()
    with torch.profiler.profile() as prof:  # a second, already compiled step
        _step(model)
    events = Counter(e.name for e in prof.events())
    return {"count": count, "eager": _step(eager), "compiled": compiled_step, "stats": stats,
            "events": events, "before": before, "after": _names(model)}


def test_compiled_loss_and_gradients_match_eager(run: dict[str, Any]) -> None:
    assert any(name.startswith("Torch-Compiled Region") for name in run["events"])  # not eager vs eager
    _assert_same_step(run["compiled"], run["eager"])


def test_every_layer_runs_one_shared_inductor_graph(run: dict[str, Any]) -> None:
    assert run["count"] == 2  # model.num_layers
    assert run["stats"]["graph_break"] == {}, list(run["stats"]["graph_break"])
    assert run["stats"]["stats"]["unique_graphs"] == 1  # layer 2 reuses layer 1's graph
    regions = sum(n for name, n in run["events"].items() if name.startswith("Torch-Compiled Region"))
    assert regions == 2, run["events"]  # one compiled forward per layer and step
    assert run["events"]["CompiledFunctionBackward"] == 2, run["events"]


def test_parameter_and_checkpoint_names_unchanged(run: dict[str, Any]) -> None:
    assert run["after"] == run["before"]


def test_dropout_graph_breaks_stay_exact(mcore_tp1: None) -> None:
    """Attention dropout forks Megatron's RNG tracker (a graph break, see runtime/compile.py);
    with aot_eager (no inductor RNG) the split layers still draw eager's dropout masks."""
    from recipec.runtime.compile import compile_transformer_layers

    dropout = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
    eager, model = _model(dropout), _model(dropout)
    torch._dynamo.reset()
    counters.clear()
    assert compile_transformer_layers([model], backend="aot_eager") == 2
    _assert_same_step(_step(model), _step(eager))
    assert counters["graph_break"], "the RNG tracker fork is expected to split the layer"


def test_refuses_wrapped_chunks() -> None:
    from recipec.runtime.compile import compile_transformer_layers

    with pytest.raises(TypeError, match="GPTModel chunk"):
        compile_transformer_layers([torch.nn.Linear(2, 2)])
