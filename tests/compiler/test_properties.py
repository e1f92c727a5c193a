"""Property tests: whatever a user types (mangled recipe text, random overrides), the compiler
either compiles it or raises RecipeError, never any other exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import attrs
from click.testing import CliRunner
from compiler_testlib import DATA, SMALL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipec.compiler import Compiled, RecipeError, build
from recipec.compiler.cli import main
from recipec.compiler.structure import all_leaf_paths, section_classes

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
WORK = Path(tempfile.mkdtemp(prefix="recipec-props-"))
# The golden fixture, standalone (its parents inlined as absolute paths) so mutations can touch `extends` too.
BASE_TEXT = SMALL.read_text().replace('"mixins/cpu_short"', json.dumps((DATA / "mixins/cpu_short.toml").as_posix()))
BASE_LINES = BASE_TEXT.splitlines()

SCHEMA_KEYS = [".".join(p) for p in all_leaf_paths()]
SECTIONS = sorted(section_classes())

ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,12}", fullmatch=True)
key_text = st.one_of(st.sampled_from(SCHEMA_KEYS), st.sampled_from(SECTIONS), ident,
                     st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(SECTIONS + ["launch.env"]), ident),
                     st.text(min_size=0, max_size=10))

scalar_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=-3, max_value=70000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf")),
    st.sampled_from(["inf", "-inf", "nan", "+nan", "1e400", "0.0", "-0.0", "1e-300", "0x7fffffffffffffff"]),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(['"RMSNorm"', '"fp32"', '"cpu"', '"mock"', '"byte"', '"lora"', '"WSD"', '"slurm"', '"text"']),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "'lit'", '""', "'''x'''"]),
)
toml_values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(ident, inner, max_size=3).map(lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    ),
    max_leaves=5,
)
garbage = st.text(max_size=20)


def _value_line(i: int, value: str) -> tuple[int, str]:
    line = BASE_LINES[i % len(BASE_LINES)]
    return i, (line.split("=", 1)[0] + "= " + value) if "=" in line else line


mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 100)),
    st.tuples(st.just("duplicate"), st.integers(0, 100)),
    st.tuples(st.just("value"), st.integers(0, 100), st.one_of(toml_values, garbage)),
    st.tuples(st.just("insert"), st.integers(0, 100), st.builds(lambda k, v: f"{k} = {v}", key_text, toml_values)),
    st.tuples(st.just("header"), st.integers(0, 100), st.builds(lambda k, aot: f"[[{k}]]" if aot else f"[{k}]",
                                                                 key_text, st.booleans())),
    st.tuples(st.just("swap"), st.integers(0, 100), st.integers(0, 100)),
    st.tuples(st.just("garbage"), st.integers(0, 100), garbage),
    st.tuples(st.just("truncate"), st.integers(0, 2000)),
)


def mutate(lines: list[str], op: tuple) -> list[str]:
    lines = list(lines)
    n = max(len(lines), 1)
    kind = op[0]
    if kind == "delete" and lines:
        del lines[op[1] % n]
    elif kind == "duplicate" and lines:
        lines.insert(op[1] % n, lines[op[1] % n])
    elif kind == "value" and lines:
        i = op[1] % n
        if "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + op[2]
    elif kind in ("insert", "header", "garbage"):
        lines.insert(op[1] % (n + 1), op[2])
    elif kind == "swap" and lines:
        i, j = op[1] % n, op[2] % n
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "truncate":
        text = "\n".join(lines)[: op[1]]
        lines = text.split("\n")
    return lines


def compiles_or_recipe_error(run) -> Compiled | None:
    try:
        compiled = run()
    except RecipeError as exc:
        assert exc.problems, "a RecipeError always carries at least one problem"
        assert str(exc)  # renders
        return None
    # a compiled recipe renders, and its artifact is plain JSON
    json.loads(compiled.to_json())
    compiled.to_toml()
    return compiled


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_recipe_text_compiles_or_raises_recipe_error(ops: list[tuple]) -> None:
    lines = BASE_LINES
    for op in ops:
        lines = mutate(lines, op)
    path = WORK / "mutated.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    compiles_or_recipe_error(lambda: build(path, artifact_dir="build/props"))


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_compile_or_raise_recipe_error(data: bytes) -> None:
    path = WORK / "bytes.toml"
    path.write_bytes(data)
    compiles_or_recipe_error(lambda: build(path, artifact_dir="build/props"))



def _choice_values() -> list[str]:
    from recipec.compiler.structure import field_of

    out = set()
    for key in SCHEMA_KEYS:
        field = field_of(tuple(key.split(".")))
        for choice in (field.metadata.get("choices") or ()) if field is not None else ():
            out.add(json.dumps(choice))
    return sorted(out)


# Mostly-valid overrides: real keys with small numbers, booleans or allowed strings, so that the
# cross-field rules, the derivations, the estimates and the plan see unusual but well-typed configs.
plausible = st.builds(
    lambda op, k, v: f"{op}{k}={v}", st.sampled_from(["", "", "", "+"]), st.sampled_from(SCHEMA_KEYS),
    st.one_of(st.integers(0, 70).map(str), st.sampled_from(["1", "2", "4", "8", "true", "false", "0.5", "0.0", "1e-9",
                                                             "9223372036854775807"]),
              st.sampled_from(_choice_values())),
)

override_strings = st.one_of(
    plausible, plausible, plausible,
    st.builds(lambda op, k, v: f"{op}{k}={v}", st.sampled_from(["", "+", "~"]), key_text, st.one_of(toml_values, garbage)),
    st.builds(lambda op, k: f"{op}{k}", st.sampled_from(["", "+", "~"]), key_text),
    st.text(max_size=30),
)


@SETTINGS
@given(st.one_of(st.lists(override_strings, min_size=1, max_size=4), st.lists(plausible, min_size=1, max_size=6)))
def test_random_overrides_compile_or_raise_recipe_error(overrides: list[str]) -> None:
    compiles_or_recipe_error(lambda: build(SMALL, overrides, artifact_dir="build/props"))


python_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                          st.integers(0, 64), st.integers(0, 64), st.sampled_from(_choice_values()).map(json.loads),
                          st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
                          st.dictionaries(ident, st.text(max_size=4), max_size=2))

_BASE = build(SMALL, artifact_dir="build/props")


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.dictionaries(st.sampled_from(SCHEMA_KEYS), python_values, min_size=1, max_size=3))
def test_random_python_overrides_compile_or_raise_recipe_error(changes: dict) -> None:
    compiled = compiles_or_recipe_error(lambda: _BASE.override(**changes))
    if compiled is not None:
        assert attrs.has(type(compiled.config))


# --- Hostile input (issue 11): deep nesting, long text, odd unicode, huge numbers. Whatever the
# shape, the compiler raises RecipeError and the CLI exits 2 with one message, never a traceback.

def _deep(n: int, kind: str) -> str:
    return {"array": "[" * n + "]" * n, "table": "{a=" * n + "1" + "}" * n, "key": ".".join(["a"] * n)}[kind]


deep_values = st.builds(_deep, st.integers(1, 3000), st.sampled_from(["array", "table"]))
deep_keys = st.builds(_deep, st.integers(1, 3000), st.just("key"))
long_text = st.integers(1, 100_000).map(lambda n: "x" * n)
odd_text = st.text(alphabet=st.one_of(st.characters(blacklist_categories=["Cs"]),
                                      st.sampled_from("\x00\x1b\x7f\x85\u2028\ufeff\U0001f600\"'\\\n\r\t[]{}=.#")),
                   min_size=1, max_size=40)
huge_numbers = st.one_of(st.integers(20, 10_000).map(lambda n: "9" * n), st.sampled_from(["1e308", "-1e308", "1e-320"]))
hostile_values = st.one_of(deep_values, long_text, odd_text, odd_text.map(json.dumps), huge_numbers)
hostile_keys = st.one_of(key_text, deep_keys, st.sampled_from(SCHEMA_KEYS), long_text, odd_text,
                         st.builds(lambda k: "launch.env." + k, st.one_of(deep_keys, long_text, odd_text)))
hostile_overrides = st.builds(lambda op, k, v: f"{op}{k}={v}", st.sampled_from(["", "+", "~"]), hostile_keys,
                              hostile_values) | st.builds(lambda op, k: f"{op}{k}", st.sampled_from(["", "~"]), hostile_keys)
hostile_lines = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.one_of(st.sampled_from(["x", "num_layers", "lr"]), deep_keys,
                                                 odd_text.map(json.dumps)), hostile_values),
    deep_keys.map(lambda k: f"[{k}]"), odd_text, long_text,
)
HOSTILE_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@HOSTILE_SETTINGS
@given(st.lists(hostile_overrides, min_size=1, max_size=3))
def test_hostile_overrides_compile_or_raise_recipe_error(overrides: list[str]) -> None:
    compiles_or_recipe_error(lambda: build(SMALL, overrides, artifact_dir="build/props"))


@HOSTILE_SETTINGS
@given(st.lists(st.tuples(st.integers(0, 100), hostile_lines), min_size=1, max_size=3))
def test_hostile_recipe_text_compiles_or_raises_recipe_error(inserts: list[tuple[int, str]]) -> None:
    lines = list(BASE_LINES)
    for at, line in inserts:
        lines.insert(at % (len(lines) + 1), line)
    path = WORK / "hostile.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    compiles_or_recipe_error(lambda: build(path, artifact_dir="build/props"))


@HOSTILE_SETTINGS
@given(st.dictionaries(st.sampled_from(SCHEMA_KEYS), st.one_of(odd_text, long_text, st.integers(-(2**80), 2**80),
                                                                st.recursive(st.integers(), lambda x: st.lists(x, max_size=2)
                                                                             | st.dictionaries(ident, x, max_size=2),
                                                                             max_leaves=40)),
                       min_size=1, max_size=3))
def test_hostile_python_overrides_compile_or_raise_recipe_error(changes: dict) -> None:
    compiles_or_recipe_error(lambda: _BASE.override(**changes))


recipe_args = st.one_of(st.just(str(SMALL)), st.just("llama3_tiny"), odd_text, long_text, deep_keys,
                        st.sampled_from(["", "/", "/etc/passwd", "/dev/null", str(DATA), "\udcff", "-"]))
cli_args = st.builds(
    lambda cmd, recipe, overrides, extra: [cmd, recipe, *overrides, *extra],
    st.sampled_from(["build", "explain", "launch"]), recipe_args, st.lists(hostile_overrides, max_size=2),
    st.sampled_from([[], ["-f", "/etc/passwd"], ["-f", "x" * 5000], ["-o", "/etc/passwd"], ["--format", "toml"],
                     ["--dry-run"]]),
)


@HOSTILE_SETTINGS
@given(cli_args)
def test_the_cli_never_prints_a_traceback(args: list[str]) -> None:
    """In-process, every command exits 0 or 2 with one message; no exception escapes the boundary."""
    if args[0] == "explain":
        args = [args[0], args[1], "model.num_layers",
                *(a for a in args[2:] if a not in ("--format", "toml", "--dry-run"))]
    elif args[0] == "launch":  # never start anything: only a dry run
        args = [a for a in args if a not in ("--format", "toml", "--dry-run")] + ["--dry-run"]
    else:
        args = [a for a in args if a != "--dry-run"]
    result = CliRunner().invoke(main, [*args, *(["-o", str(WORK / "cli-out")] if "-o" not in args
                                                and args[0] != "explain" else [])])
    assert result.exit_code in (0, 2), (args[:3], result.exception, result.output[-2000:])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:  # ours, or click's usage error (an override that reads as an option)
        assert result.output.startswith(("recipec: error: ", "Usage: ", "Error: ")), result.output
