"""Messages a new user meets (issue 14, item 4, and issue 11's follow-ups): `recipec explain` and
`recipec diff` speak TOML and give the same hints as `build`, `+launch.env.X` entries keep their
provenance everywhere, and every validation problem (launch rules included) is in one report."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner, Result
from compiler_testlib import SMALL, write
from recipec import compiler
from recipec.compiler import RecipeError, ValidationError, build
from recipec.compiler.cli import main
from recipec.compiler.executors import executor_for
from recipec.compiler.executors.base import ScriptFile
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.tree import Tree
from recipec.compiler.validate import naming, validate

LINUX_ENV_STRING = 128 * 1024  # MAX_ARG_STRLEN: bytes of one NAME=value string, its NUL included
OVERLAY = "# more env\n[launch.env]\nFROM_OVERLAY = \"yes\"\n"


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def user_error(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("recipec: error: "), result.output
    return result.output


# explain: the same "did you mean" as build, and a free-table entry that is not there is "unset".

@pytest.mark.parametrize(("key", "hint"), [
    ("model.num_layrs", "did you mean `model.num_layers`?"),
    ("num_layers", "`num_layers` lives in [model]: write `model.num_layers`"),
    ("modle.num_layers", "did you mean `model.num_layers`?"),
    ("model.tensor_model_parallel_size", "write `parallel.tensor_model_parallel_size`"),
    ("trian", "did you mean `train`?"),
    ("model.num_layers.x", "`model.num_layers` is a value, not a table"),
    ("launch.env.A.B", "`launch.env.A` is a value, not a table"),
])
def test_explain_unknown_key_says_did_you_mean(in_tmp: Path, key: str, hint: str) -> None:
    out = user_error("explain", str(SMALL), key)
    assert out.startswith(f"recipec: error: [{key}] no key `{key}` in the schema\n   hint: "), out
    assert hint in out


def test_explain_missing_env_entry_says_it_is_unset(in_tmp: Path) -> None:
    out = ok("explain", str(SMALL), "launch.env.MISSING")
    assert out.splitlines() == [
        "launch.env.MISSING is unset: [launch.env] has no entry MISSING",
        ('  set it:  +launch.env.MISSING=VALUE on the command line, or MISSING = "VALUE" under [launch.env] '
         "in the recipe or an -f overlay"),
        "  help:    Extra environment variables for every rank.",
    ]


def test_explain_env_entries_show_their_provenance(in_tmp: Path) -> None:
    write(in_tmp / "o.toml", OVERLAY)
    args = (str(SMALL), "+launch.env.FROM_CLI=1", "-f", "o.toml")
    assert ok("explain", *args[:1], "launch.env.FROM_CLI", *args[1:]).splitlines()[:2] == [
        'launch.env.FROM_CLI = "1"', "  set by:  CLI '+launch.env.FROM_CLI=1'"]
    assert ok("explain", *args[:1], "launch.env.FROM_OVERLAY", *args[1:]).splitlines()[:2] == [
        'launch.env.FROM_OVERLAY = "yes"', "  set by:  overlay o.toml:3"]
    whole = ok("explain", *args[:1], "launch.env", *args[1:]).splitlines()
    assert whole[0] == 'launch.env = { RECIPEC_GOLDEN = "1", FROM_OVERLAY = "yes", FROM_CLI = "1" }'
    assert whole[1] == ("  set by:  RECIPEC_GOLDEN: tests/compiler/data/small.toml:23; FROM_OVERLAY: overlay o.toml:3; "
                        "FROM_CLI: CLI '+launch.env.FROM_CLI=1'")
    assert whole[2] == "  default: {}"


def test_explain_writes_values_and_defaults_as_toml(in_tmp: Path) -> None:
    assert ok("explain", str(SMALL), "data.kind").splitlines()[0] == 'data.kind = "mock"'
    lines = ok("explain", str(SMALL), "launch.slurm_exclusive", "launch.slurm_exclusive=false").splitlines()
    assert lines[0] == "launch.slurm_exclusive = false" and lines[2] == "  default: true"
    assert ok("explain", str(SMALL), "profiling.profile_ranks").splitlines()[0] == "profiling.profile_ranks = [0]"
    unset = ok("explain", str(SMALL), "model.rope_scaling").splitlines()
    assert unset[0] == "model.rope_scaling = (unset)" and unset[2] == "  default: (unset)"
    assert unset[4] == '  allowed: "llama3", "linear", "yarn"'


def test_explain_a_section_lists_its_keys(in_tmp: Path) -> None:
    lines = ok("explain", str(SMALL), "launch").splitlines()
    assert lines[0] == "[launch]" and 'accelerator = "cpu"  # tests/compiler/data/mixins/cpu_short.toml:19' in lines
    assert lines[-2:] == ["[launch.env]", 'RECIPEC_GOLDEN = "1"  # tests/compiler/data/small.toml:23']


# diff: TOML values, not Python reprs.

def test_diff_prints_toml_values(in_tmp: Path) -> None:
    write(in_tmp / "b.toml", f'extends = "{SMALL.as_posix()}"\n[data]\nkind = "indexed"\npaths = ["a"]\n'
                             "[profiling]\nprofile_ranks = [1, 2]\nrecord_shapes = true\n[launch.env]\nNEW = \"x\"\n")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in ok("diff", str(SMALL), "b.toml").splitlines()}
    assert rows["data.kind"] == '"mock"  ->  "indexed"'
    assert rows["data.paths"] == '[]  ->  ["a"]'
    assert rows["profiling.profile_ranks"] == "[0]  ->  [1, 2]"
    assert rows["profiling.record_shapes"] == "false  ->  true"
    assert rows["launch.env.NEW"] == '(unset)  ->  "x"'
    assert "launch.env" not in rows  # the table itself is not a value of its own


# +launch.env.X entries keep their provenance in --format toml and resolved.toml.

def test_env_entries_keep_provenance_in_resolved_toml(in_tmp: Path) -> None:
    write(in_tmp / "o.toml", OVERLAY)
    text = ok("build", str(SMALL), "+launch.env.FROM_CLI=1", "-f", "o.toml", "--format", "toml", "-o", "out")
    assert text == (in_tmp / "out" / "resolved.toml").read_text()
    tail = text[text.index("\n[launch.env]\n"):].splitlines()[2:]
    assert tail == ['RECIPEC_GOLDEN = "1"  # tests/compiler/data/small.toml:23',
                    'FROM_OVERLAY = "yes"  # overlay o.toml:3',
                    "FROM_CLI = \"1\"  # CLI '+launch.env.FROM_CLI=1'"]
    assert tomllib.loads(text)["launch"]["env"] == {"RECIPEC_GOLDEN": "1", "FROM_OVERLAY": "yes", "FROM_CLI": "1"}
    assert not re.search(r"^env = ", text, re.MULTILINE)  # not also written inline under [launch]


def test_env_entries_set_from_python_keep_provenance(in_tmp: Path) -> None:
    text = build(SMALL, python={"launch.env.FROM_PY": "2"}).to_toml()
    assert 'FROM_PY = "2"  # Python (launch.env.FROM_PY)' in text
    assert "env = {}  # default" in build(SMALL, ["~launch.env"]).to_toml()  # an empty table stays one line


# validate(): the executor's launch rules are reported with every other problem.

def test_validate_reports_launch_rules(in_repo: Path) -> None:
    compiled = build(SMALL)
    launch = attrs.evolve(compiled.config.launch, env={"LD_PRELOAD": "x.so", "1BAD": "v"})
    findings = validate(attrs.evolve(compiled.config, launch=launch), compiled.tree)
    assert [p.key for p in findings.errors] == ["launch.env.LD_PRELOAD", 'launch.env."1BAD"']


def test_a_name_is_reported_once(in_tmp: Path) -> None:
    """`naming` and the launch rules both refuse a name with a line break: one problem, not two."""
    write(in_tmp / "r.toml", f'extends = "{SMALL.as_posix()}"\nname = "ab\\n"\n')
    with pytest.raises(ValidationError) as info:
        build("r.toml")
    assert [p.key for p in info.value.problems] == ["name"]


def test_naming_refuses_a_trailing_newline() -> None:
    """`re.match(...$)` let "name\\n" through; fullmatch does not."""
    assert [f[0] for f in naming(RecipeConfig(name="my_llama\n"))] == ["name"]
    assert list(naming(RecipeConfig(name="my_llama"))) == []


def test_env_string_limit_is_exact(in_tmp: Path) -> None:
    value = "x" * (LINUX_ENV_STRING - len("BIG=") - 1)  # NAME=value and its NUL: exactly 128 KiB
    assert build(SMALL, [f"+launch.env.BIG={value}"]).config.launch.env["BIG"] == value
    with pytest.raises(ValidationError, match=r"\[launch\.env\.BIG\] the entry is 131,073 bytes"):
        build(SMALL, [f"+launch.env.BIG={value}x"])
    long_name = "N" * LINUX_ENV_STRING
    with pytest.raises(RecipeError, match=r"the entry is 131,075 bytes .* name 131,072 characters"):
        build(SMALL, [f"+launch.env.{long_name}=1"])


@pytest.mark.parametrize(("key", "limit"), [("nodes", 1048576), ("gpus_per_node", 4096), ("max_restarts", 10**6),
                                            ("preempt_grace_s", 65535)])
def test_launch_numbers_have_upper_bounds(in_tmp: Path, key: str, limit: int) -> None:
    with pytest.raises(RecipeError, match=rf"\[launch\.{key}\] must be <= {limit}, got {limit + 1}"):
        build(SMALL, [f"launch.{key}={limit + 1}"])


# build lists the scripts its executor wrote; the package exports every error kind.

def test_build_lists_the_executors_scripts(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "wrote    build/small/resolved.toml, plan.json, launch.sh\n" in ok("build", str(SMALL))
    slurm = ok("build", str(SMALL), "launch.executor=slurm")
    assert "wrote    build/small/resolved.toml, plan.json, launch.sh, job.sbatch\n" in slurm
    local = executor_for("local")
    scripts = local.scripts
    monkeypatch.setattr(type(local), "script_names", ("launch.sh", "extra.sh"))
    monkeypatch.setattr(local, "scripts", lambda built, python=None: [*scripts(built, python),
                                                                      ScriptFile("extra.sh", "#!/bin/sh\n")])
    assert "wrote    build/small/resolved.toml, plan.json, launch.sh, extra.sh\n" in ok("build", str(SMALL))


def test_every_error_kind_is_exported() -> None:
    from recipec.compiler import errors

    kinds = {name for name, value in vars(errors).items()
             if isinstance(value, type) and issubclass(value, RecipeError)}
    assert kinds <= set(compiler.__all__), kinds - set(compiler.__all__)
    assert compiler.ExtendsLimitError is errors.ExtendsLimitError


def test_empty_tree_has_no_headers() -> None:
    assert Tree().header_source(("model",)) is None
