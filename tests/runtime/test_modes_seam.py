"""The training-mode seam (compiler/modes + runtime/modes): registry, the train.mode derivation
rule, each mode's refusals, the estimate hooks for a mode's frozen models, and that no shared
file names a mode. Compiles only; no torch needed except for the runtime registry check."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from recipec.compiler import build
from recipec.compiler import modes as compiler_modes
from recipec.compiler.errors import RecipeError
from recipec.compiler.modes.base import ExtraModel

REPO = Path(__file__).resolve().parents[2]
SFT = ["data.kind=sft", 'data.paths=["x.jsonl"]']


def test_mode_is_derived_from_the_data_when_unset() -> None:
    assert build("llama3_tiny", []).config.train.mode == "pretrain"
    assert build("llama3_tiny", SFT).config.train.mode == "sft"
    assert build("llama32_1b_sft", []).config.train.mode == "sft"
    assert build("llama3_tiny", [*SFT, "train.mode=sft"]).config.train.mode == "sft"
    compiled = build("llama3_tiny_sft_packed", ['data.paths=["a.jsonl"]'])
    assert compiled.config.train.mode == "sft" and compiled.config.data.packing


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["train.mode=pretrain", *SFT], "train.mode", 'train.mode "pretrain" trains on every token'),
    (["train.mode=sft"], "data.kind", 'train.mode "sft" reads jsonl'),
    (["data.packing=true"], "data.packing", "data.packing packs finetuning examples"),
    ([*SFT, "data.packing=true", "train.micro_batch_size=2", "train.global_batch_size=16"],
     "train.micro_batch_size", "one per microbatch"),
    ([*SFT, "data.packing=true", "train.micro_batch_size=1", "parallel.context_parallel_size=2",
      "launch.gpus_per_node=2"], "parallel.context_parallel_size", "context parallelism"),
])
def test_each_mode_refuses_what_it_cannot_run(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(RecipeError) as info:
        build("llama3_tiny", overrides)
    problems = [p for p in info.value.problems if p.key == key]
    assert problems and words in problems[0].message, str(info.value)


def test_a_refusal_is_one_message_and_exit_2_from_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "build", "llama3_tiny", "train.mode=sft",
                           "-o", str(tmp_path / "b")], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.kind" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_unknown_mode_lists_the_registered_ones() -> None:
    with pytest.raises(RecipeError) as info:
        build("llama3_tiny", ["train.mode=no_such_mode"])
    assert "'pretrain'" in str(info.value) and "'sft'" in str(info.value)


def test_a_modes_frozen_models_enter_the_memory_and_flops_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a DPO reference or a distillation teacher will add: weights (no grads, no optimizer) and
    a forward pass per sequence. Its plug-in only returns ExtraModel; the estimate does the rest."""
    base = build("llama32_1b_sft", [])
    sft = compiler_modes.mode_for("sft")

    class WithReference:
        name = "sft"
        options = None

        def rules(self, config):
            return sft.rules(config)

        def extra_models(self, config):
            return [ExtraModel("reference", config.model)]

    monkeypatch.setattr(compiler_modes, "mode_for", lambda name: WithReference())
    extra = build("llama32_1b_sft", [])
    gib, plan = extra.plan.memory_gib, base.plan
    weights_gib = plan.memory_gib["weights"]
    assert gib["extra_models"] == pytest.approx(weights_gib, abs=0.02)  # same model, same layout, weights only
    assert gib["total"] == pytest.approx(plan.memory_gib["total"] + weights_gib, abs=0.03)
    assert extra.plan.flops_per_step == pytest.approx(plan.flops_per_step * 4 / 3, rel=1e-6)  # + one forward


def test_a_modes_own_keys_are_checked_by_its_plug_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """[train.mode_options]: the mode's attrs class says which keys exist, their types and bounds."""
    from recipec.compiler.schema._fields import option

    @attrs.frozen
    class Options:
        beta: float = option(0.1, "Strength of the KL penalty.", min=0.0, max=10.0)

    class WithOptions:
        name = "sft"
        options = Options

        def rules(self, config):
            return iter(())

        def extra_models(self, config):
            return ()

    monkeypatch.setattr(compiler_modes, "mode_for", lambda name: WithOptions())
    compiled = build("llama3_tiny", [*SFT, "+train.mode_options.beta=0.5"])
    assert compiler_modes.options(compiled.config) == Options(beta=0.5)
    for bad, words in (("+train.mode_options.betta=0.5", "did you mean `beta`"),
                       ("+train.mode_options.beta=-1.0", "must be >= 0.0")):
        with pytest.raises(RecipeError) as info:
            build("llama3_tiny", [*SFT, bad])
        assert words in str(info.value) and "train.mode_options.bet" in str(info.value)
    monkeypatch.undo()
    with pytest.raises(RecipeError, match="train.mode 'sft' has no option 'beta'"):
        build("llama3_tiny", [*SFT, "+train.mode_options.beta=0.5"])


def test_compiler_and_runtime_register_the_same_modes() -> None:
    pytest.importorskip("torch")
    runtime_modes = importlib.import_module("recipec.runtime.modes")
    base = importlib.import_module("recipec.runtime.modes.base")
    assert runtime_modes.__name__ == "recipec.runtime.modes"
    for name in compiler_modes.MODES:  # each compiler half has its runtime half, named alike
        cls = importlib.import_module(f"recipec.runtime.modes.{name}").MODE
        assert issubclass(cls, base.TrainingMode) and cls.name == name
        assert compiler_modes.mode_for(name).name == name


SHARED = ["runtime/train.py", "runtime/loop.py", "runtime/data.py", "runtime/metrics.py", "compiler/validate.py",
          "compiler/estimate.py", "compiler/plan.py"]


@pytest.mark.parametrize("path", SHARED)
def test_no_shared_file_names_a_mode(path: str) -> None:
    """Design: a mode is found by its key; shared code never asks which one it is."""
    text = (REPO / path).read_text()
    names = "|".join(re.escape(json.dumps(n)) for n in compiler_modes.MODES)
    assert not re.search(rf"mode\s*[!=]=\s*({names})", text), path
    assert not re.search(r"\b(train\.mode|\.mode)\s*(==|!=|in)\s*", text), path


def test_derivation_rule_is_documented_in_the_schema() -> None:
    from recipec.compiler.schema import TrainConfig

    field = attrs.fields_dict(TrainConfig)["mode"]
    assert field.metadata["derived"] == compiler_modes.DERIVED_RULE
    assert 'data.kind is "sft"' in field.metadata["derived"]
