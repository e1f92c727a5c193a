"""The TOML writer: every value recipec writes reads back as itself, and no text in a comment
(a file name, an override, a config.json string) can start a TOML line of its own."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from compiler_testlib import DATA, SMALL, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipec.compiler import RecipeError, build
from recipec.compiler.render import (
    toml_comment,
    toml_document,
    toml_key,
    toml_string,
    toml_value,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# Any Unicode scalar value (no lone surrogates: Python-only, not text), biased to the hostile ones.
hostile = st.sampled_from(['"', "\\", "\n", "\r", "\x00", "\x7f", "\x85", "\u2028", "\u2029", "\x1b[2J", '"""', "'''",
                           "]]", "[", "#", "=", "\U0001f600", "\ufeff", "\t", "\x0b", "\x0c"])
text = st.lists(st.one_of(st.characters(blacklist_categories=["Cs"]), hostile), max_size=12).map("".join)
scalars = st.one_of(text, st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)


@SETTINGS
@given(text)
def test_strings_and_keys_read_back_as_themselves(s: str) -> None:
    assert tomllib.loads(f"v = {toml_string(s)}") == {"v": s}
    assert toml_string(s).isascii()
    assert tomllib.loads(f"{toml_key(s)} = 1") == {s: 1}


@SETTINGS
@given(text)
def test_a_comment_is_one_line_whatever_it_holds(s: str) -> None:
    comment = toml_comment(s)
    assert "\n" not in comment and "\r" not in comment
    assert tomllib.loads(f"x = 1  {comment}\n{comment}\ny = 2\n") == {"x": 1, "y": 2}


@SETTINGS
@given(st.dictionaries(text, values, max_size=4), st.lists(text, max_size=3), st.dictionaries(text, st.lists(text, max_size=2)))
def test_a_document_reads_back_as_its_data(data: dict, header: list[str], notes: dict) -> None:
    assert tomllib.loads(toml_document(data, header, notes)) == data


def test_json_bytes_are_kept_where_toml_allows_them() -> None:
    """Artifacts written before this writer are unchanged: ASCII and BMP text as json.dumps wrote it."""
    for s in ["plain", 'q"uote', "back\\slash", "new\nline", "é", "\u4e2d\u6587", "\x01\x7f"]:
        assert toml_string(s) == json.dumps(s)
    assert toml_string("\U0001f600") == '"\\U0001f600"'  # json.dumps writes a surrogate pair, which TOML refuses
    with pytest.raises(TypeError):
        toml_value("\udcff")


def test_resolved_toml_with_hostile_names_and_values_reads_back(in_tmp: Path) -> None:
    """A recipe file whose name holds a newline and a table header, a description with every odd
    character: resolved.toml still parses, with exactly the schema's keys and the given values."""
    name = 'evil\n[launch.env]\nINJECTED = "1" #.toml'
    description = 'a"b\\c\n[x]\r\x7f\u2028\U0001f600 """ ]]'
    mixin = json.dumps((DATA / "mixins/cpu_short.toml").as_posix())
    base = SMALL.read_text().replace('"mixins/cpu_short"', mixin).replace('description = "golden fixture: small '
                                                                         'Llama on CPU"', "")
    write(in_tmp / name, base + f"\n[logging]\nwandb_exp_name = {toml_string(description)}\n")
    compiled = build(name, [f"description={toml_string(description)}", "name=ok"])
    resolved = compiled.to_toml()
    data = tomllib.loads(resolved)
    assert data["description"] == description and data["logging"]["wandb_exp_name"] == description
    plain = tomllib.loads(build(SMALL).to_toml())
    assert data["launch"]["env"] == plain["launch"]["env"] and "INJECTED" not in data["launch"]["env"]
    assert set(data) == set(plain)  # no injected table, and in each table no injected key
    assert all(set(data[t]) - {"wandb_exp_name"} == set(plain[t]) for t in data if isinstance(data[t], dict))


def test_lone_surrogates_from_python_are_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="lone surrogate"):
        build(SMALL).override(description="bad \udcff")
