"""Model families as plug-ins (compiler/families): found without a central list, an unknown
`model.architecture` is one clear error, no `architecture ==` branches outside family files, and
the compiler never imports the runtime (the torch-needing commands are a declared table)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from compiler_testlib import REPO, SMALL, write

from recipec.compiler import build, families
from recipec.compiler.cli import RUNTIME_COMMANDS, main
from recipec.compiler.errors import RecipeError
from recipec.compiler.hf_import import hf_config, model_fields

# The families this change moved onto the registry (other modules may add more).
MOVED = {"gpt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"}


def test_registry_finds_every_family_module() -> None:
    assert MOVED <= set(families.names())
    assert "gemma2" not in families.names()
    seen: dict[str, str] = {}
    for family in families.all_families():
        assert family.summary and "\n" not in family.summary
        for model_type in family.hf_model_types:  # one importer per config.json model_type
            assert model_type not in seen, (model_type, family.name, seen[model_type])
            seen[model_type] = family.name
            assert families.for_hf_model_type(model_type) is family
    assert families.for_hf_model_type("no_such_type") is None


def test_a_new_module_is_a_new_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a family is adding a module: no list, schema choice or `if` elsewhere changes."""
    write(tmp_path / "toyfam.py", '''
from recipec.compiler.families import _decoder as d
from recipec.compiler.families.base import Family, FamilyProblem


def _validate(model):
    if model.num_layers % 2:
        yield FamilyProblem("model.num_layers", "toy models have an even number of layers", "use 2 or 4")


FAMILIES = (Family(name="toy", summary="a test family", hf_model_types=("toy",), hf_class="ToyForCausalLM",
                   base="_base/llama2", import_hf=lambda c, m: (d.import_decoder(c, m), d.import_rope(c, m)),
                   export_hf=lambda model, cfg: d.export_decoder(model, cfg), validate=_validate),)
''')
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    families._registry.cache_clear()
    try:
        assert families.get("toy").hf_class == "ToyForCausalLM"
        assert build(SMALL, ["model.architecture=toy"]).config.model.architecture == "toy"
        with pytest.raises(RecipeError) as err:  # the family's own rule, reported like any validation error
            build(SMALL, ["model.architecture=toy", "model.num_layers=3"])
        assert "[model.num_layers] toy models have an even number of layers" in str(err.value)
        assert "hint: use 2 or 4" in str(err.value)
        fields, family = model_fields({"model_type": "toy", "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256})
        assert family.name == "toy" and fields["architecture"] == "toy" and fields["num_layers"] == 2
    finally:
        sys.modules.pop(f"{families.__name__}.toyfam", None)
        families._registry.cache_clear()


def test_unknown_architecture_is_one_clear_error(in_tmp: Path) -> None:
    recipe = write(in_tmp / "r.toml", 'extends = ["_base/pretrain", "_base/llama2"]\n[model]\narchitecture = "lama"\n')
    result = CliRunner().invoke(main, ["build", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "r.toml:3: [model.architecture] 'lama' is not a model family recipec knows" in result.output
    assert "'llama'" in result.output and "hint: did you mean `llama`?" in result.output
    # "gemma2" was accepted and could not run; it is an error now (no family has it)
    with pytest.raises(RecipeError, match="'gemma2' is not a model family"):
        build(SMALL, ["model.architecture=gemma2"])
    with pytest.raises(RecipeError, match="did you mean `llama`"):
        families.get("lama")


def test_export_of_a_family_without_hf_class_is_an_hf_error() -> None:
    from recipec.compiler.hf_fields import HFImportError

    with pytest.raises(HFImportError, match="'gpt' has no Hugging Face export mapping"):
        hf_config(build(SMALL, ["model.architecture=gpt"]).config.model)


def _python_files(*roots: str) -> list[Path]:
    return [p for root in roots for p in sorted((REPO / root).rglob("*.py"))]


def test_no_family_branches_outside_family_files() -> None:
    """`architecture ==` and `model_type ==` (or `in (...)`) live in compiler/ and runtime/ families only."""
    branch = re.compile(r"""(architecture|model_type)\s*(==|!=|\bin\s*\(|\bnot in\s*\()""")
    offenders = []
    for path in _python_files("compiler", "runtime"):
        if "families" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if branch.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_compiler_never_imports_the_runtime() -> None:
    """No import statement in compiler/ names the runtime (torch-needing commands are the declared
    RUNTIME_COMMANDS table, imported by name when one runs)."""
    offenders = []
    for path in _python_files("compiler"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                depth = len(path.relative_to(REPO / "compiler").parts)  # how far `..` climbs out of compiler/
                climbs_out = name.startswith("." * (depth + 1)) and "runtime" in name
                if name.startswith(("recipec.runtime", "runtime", "torch", "megatron")) or climbs_out:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, "\n".join(offenders)
    assert all(re.fullmatch(r"recipec\.runtime(\.\w+)+:\w+", target) for target, _ in RUNTIME_COMMANDS.values())


def test_build_and_cli_import_neither_torch_nor_the_runtime() -> None:
    code = ("import sys; from recipec.compiler.cli import main; from recipec.compiler import build; "
            "from recipec.compiler import families; build('llama3_tiny'); families.all_families(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron') "
            "or m.startswith('recipec.runtime')); print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runtime_cli_uses_the_public_conventions_only() -> None:
    """runtime/hf/cli.py takes the CLI conventions from compiler/cli_base.py, not compiler/cli.py's
    privates (that import made compiler.cli -> runtime.hf.cli -> compiler.cli a cycle)."""
    tree = ast.parse((REPO / "runtime" / "hf" / "cli.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "recipec.compiler.cli_base" in modules and "recipec.compiler.cli" not in modules
