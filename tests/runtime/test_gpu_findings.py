"""What the GPU found in session 6, checked on CPU: biased MoE models (GPT-OSS) on the GPU paths, and
torch Adam resuming outside CPU mode.

Both failures were seen first on an H200 with TE and Megatron-Core 0.19 (session 6): Megatron's grouped-GEMM experts assert
against the fused bias-dropout-add with linear biases, and per-expert MLPs on the TE spec add the
expert bias in place into TE's output view. The GPU config is built here with on_gpu=True (a config
object only, nothing runs on a GPU) and the per-expert spec fix is checked for any linear class.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("torch")

from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules
from recipec.compiler import build
from recipec.runtime.families.gpt_oss import _CopiesBiasedOutput, _fix_expert_bias
from recipec.runtime.model import transformer_config


@pytest.mark.parametrize(("recipe", "fused"), [("gpt_oss_tiny", False), ("deepseek_v3_tiny", True), ("llama3_tiny", True)])
def test_bias_dropout_fusion_is_off_only_for_biased_moe(recipe: str, fused: bool) -> None:
    config = transformer_config(build(recipe).config, on_gpu=True, te=False)
    assert config.bias_dropout_fusion is fused


class OtherRowLinear(RowParallelLinear):
    """Stands for TE's TERowParallelLinear: any row-parallel class the spec may name."""


def _moe_layer(fc2: type, experts: type = SequentialMLP, partials: bool = False) -> ModuleSpec:
    """A decoder layer spec with MoE experts, written as Megatron-Core 0.16 does (ModuleSpecs) or as
    0.19 does (functools.partial(Module, submodules=...) for the MoE layer and its experts)."""
    def spec(module: type, submodules: object) -> object:
        return functools.partial(module, submodules=submodules) if partials else \
            ModuleSpec(module=module, submodules=submodules)

    expert_spec = spec(experts, MLPSubmodules(linear_fc1=None, linear_fc2=fc2))
    moe = spec(object, type("MoESub", (), {"experts": expert_spec})())
    return ModuleSpec(module=object, submodules=TransformerLayerSubmodules(mlp=moe))


def _fc2(layer: ModuleSpec) -> type:
    moe = layer.submodules.mlp
    moe_sub = moe.keywords["submodules"] if isinstance(moe, functools.partial) else moe.submodules
    experts = moe_sub.experts
    return (experts.keywords["submodules"] if isinstance(experts, functools.partial) else experts.submodules).linear_fc2


@pytest.mark.parametrize("partials", [False, True], ids=["mcore-0.16-specs", "mcore-0.19-partials"])
@pytest.mark.parametrize("fc2", [RowParallelLinear, OtherRowLinear])
def test_per_expert_fc2_copies_its_output_whatever_its_class(fc2: type, partials: bool) -> None:
    layer = _moe_layer(fc2, partials=partials)
    _fix_expert_bias(layer)
    fixed = _fc2(layer)
    assert issubclass(fixed, fc2) and issubclass(fixed, _CopiesBiasedOutput)
    _fix_expert_bias(layer)  # idempotent: no second wrapper
    assert _fc2(layer) is fixed


def test_grouped_experts_are_left_alone() -> None:
    class Grouped:  # grouped-GEMM experts add their bias themselves
        pass

    layer = _moe_layer(RowParallelLinear, experts=Grouped, partials=True)
    _fix_expert_bias(layer)
    assert _fc2(layer) is RowParallelLinear


def test_torch_adam_keeps_its_step_on_load_outside_cpu_mode() -> None:
    """A GPU without Apex/TE runs torch Adam inside Megatron's distributed optimizer, as CPU mode does;
    its final (fully_reshardable) checkpoint failed to resume there (KeyError 'step', H200 with
    megatron-core 0.19, session 6) because the step fix was installed by CPU mode only. A fresh
    process that never enters CPU mode must get it from the load's own preparation."""
    code = (
        "import torch\n"
        "from types import SimpleNamespace\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D\n"
        "from recipec.runtime import adam_state, device\n"
        "assert not getattr(D._set_main_param_and_optimizer_states, '__recipec_cpu__', False)\n"
        "p = torch.nn.Parameter(torch.zeros(2))\n"
        "adam_state.prime_optimizer_state_for_load(SimpleNamespace(optimizer=torch.optim.Adam([p])))\n"
        "assert getattr(D._set_main_param_and_optimizer_states, '__recipec_cpu__', False)\n"
        "assert not device._ACTIVE\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_mla_without_q_lora_is_refused_by_name_where_megatron_adds_a_q_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron-core 0.19's MLA makes the q projection of a model without q LoRA a fused norm+linear
    (DeepSeek-V2-Lite has no such norm); found running the DeepSeek HF tests against 0.19 on CPU.
    Where the installed Megatron does that, the run stops with the key and a fix, before building."""
    from recipec.compiler.errors import RecipeError
    from recipec.runtime.families import deepseek

    model = build("deepseek_v2_lite").config.model
    assert model.q_lora_rank is None
    monkeypatch.setattr(deepseek, "_mla_puts_a_norm_on_q", lambda: True)
    with pytest.raises(RecipeError) as refused:
        deepseek.layer_spec(model, None)
    assert "model.q_lora_rank" in str(refused.value) and "megatron-core 0.16" in str(refused.value)
