"""The Megatron-Bridge seed's examples, as the README shows them in recipec: CLI overrides,
a whole-model replacement (TOML overlay and Python), and the old `model.` spelling of TP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from recipec.compiler import RecipeError, build
from recipec.compiler.cli import main

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_python_style_overrides_on_the_command_line() -> None:
    c = build("llama3_8b", ["train.train_iters=20", "train.global_batch_size=8", "train.micro_batch_size=1",
                            "logging.log_interval=1"])
    t = c.config.train
    assert (t.train_iters, t.global_batch_size, t.micro_batch_size, c.config.logging.log_interval) == (20, 8, 1, 1)
    assert c.plan.microbatches_per_step == 8 // (1 * c.plan.data_parallel_size)


def test_replacing_the_model_with_an_overlay() -> None:
    c = build("llama3_8b", overlays=[str(REPO / "examples" / "small_llama3.toml")])
    m = c.config.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (2, 768, 2688, 16)
    assert m.kv_channels == 48 and m.num_query_groups == 16  # derived again, not inherited from 8B
    assert c.plan.params_total < 300_000_000


def test_the_readme_python_example_runs() -> None:
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "build(" in b)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    small = namespace["small"]
    assert small.config.model.num_layers == 2 and small.config.model.kv_channels == 48  # type: ignore[attr-defined]
    assert small.config.train.train_iters == 20  # type: ignore[attr-defined]


def test_megatron_spelling_of_tensor_parallelism_gets_a_precise_hint() -> None:
    with pytest.raises(RecipeError) as info:
        build("llama3_8b", ["model.tensor_model_parallel_size=4", "train.train_iters=100000"])
    assert "parallel.tensor_model_parallel_size" in str(info.value)
    result = CliRunner().invoke(main, ["build", "llama3_8b", "model.tensor_model_parallel_size=4",
                                       "train.train_iters=100000"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_recipec_spelling_of_tensor_parallelism_compiles(tmp_path: Path) -> None:
    c = build("llama3_8b", ["parallel.tensor_model_parallel_size=4", "train.train_iters=100000"])
    assert c.config.parallel.tensor_model_parallel_size == 4 and c.config.train.train_iters == 100000
