"""The compiler's main path: bundled recipes build, overrides apply, no torch is imported."""

import subprocess
import sys

from recipec.compiler import build


def test_llama3_8b_builds_with_cli_override() -> None:
    compiled = build("llama3_8b", ["train.train_iters=100"])
    assert compiled.config.train.train_iters == 100
    assert compiled.plan.params_total == 8_030_261_248
    assert compiled.plan.world_size == 8


def test_importing_the_compiler_loads_no_torch() -> None:
    code = "import sys, recipec.compiler; from recipec.compiler import build; build('llama3_8b'); " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformer_engine', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
