"""Overrides after the recipe: overlay files, dotted strings (set, +add, ~unset), TOML values,
the same strings from Python, Compiled.override, from_config, whole-table replacement, provenance."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from compiler_testlib import DATA, SMALL, write

from recipec.compiler import (
    ModelConfig,
    OverrideError,
    RecipeError,
    TypeMismatchError,
    ValidationError,
    build,
    from_config,
)
from recipec.compiler.cli import main
from recipec.compiler.overrides import parse_value

DENSE = DATA / "dense.toml"


def test_dotted_override_sets_a_key(in_repo: Path) -> None:
    c = build(SMALL, ["train.train_iters=20", "model.num_layers=2"])
    assert (c.config.train.train_iters, c.config.model.num_layers) == (20, 2)
    assert c.plan.params_total < build(SMALL).plan.params_total


def test_later_overrides_win_and_overlays_come_first(in_tmp: Path) -> None:
    write(in_tmp / "o1.toml", "[train]\ntrain_iters = 30\nseed = 7\n")
    write(in_tmp / "o2.toml", "[train]\ntrain_iters = 40\n")
    c = build(SMALL, ["train.seed=9", "train.seed=11"], overlays=["o1.toml", "o2.toml"])
    assert c.config.train.train_iters == 40  # o2 after o1
    assert c.config.train.seed == 11  # dotted strings after overlays, in order
    chain = c.tree.chains[("train", "seed")]
    assert [s.kind for s in chain] == ["overlay", "cli", "cli"]


def test_overlay_via_cli(in_tmp: Path) -> None:
    write(in_tmp / "small_overlay.toml", "[model]\nnum_layers = 2\n[train]\ntrain_iters = 20\n")
    result = CliRunner().invoke(main, ["build", str(SMALL), "-f", "small_overlay.toml", "--format", "toml"])
    assert result.exit_code == 0, result.output
    assert "num_layers = 2  # tests/compiler/data/small.toml:6, overridden by overlay small_overlay.toml:2" in result.output
    assert "train_iters = 20  # tests/compiler/data/mixins/cpu_short.toml:3, overridden by overlay small_overlay.toml:4" \
        in result.output


def test_plus_adds_an_entry_to_a_free_table(in_repo: Path) -> None:
    c = build(SMALL, ["+launch.env.X=1", "+launch.env.NCCL_DEBUG=INFO", '+launch.env.PATHS="a b"'])
    assert c.config.launch.env == {"RECIPEC_GOLDEN": "1", "X": "1", "NCCL_DEBUG": "INFO", "PATHS": "a b"}
    assert c.plan.env["X"] == "1" and c.plan.env["NCCL_DEBUG"] == "INFO"
    # an existing entry can be set without `+`; a new one needs it
    assert build(SMALL, ["launch.env.RECIPEC_GOLDEN=2"]).config.launch.env["RECIPEC_GOLDEN"] == "2"
    with pytest.raises(OverrideError, match=r"hint: add a new entry with \+launch\.env\.Y=1"):
        build(SMALL, ["launch.env.Y=1"])


def test_plus_is_accepted_on_schema_keys(in_repo: Path) -> None:
    assert build(SMALL, ["+train.seed=5"]).config.train.seed == 5


def test_tilde_unsets_back_to_default_or_derived(in_repo: Path) -> None:
    base = build(DENSE)
    assert base.config.model.ffn_hidden_size == 5632
    c = build(DENSE, ["~model.ffn_hidden_size", "~model.num_query_groups", "~scheduler.lr_warmup_fraction",
                      "~train.train_iters"])
    m = c.config.model
    assert m.ffn_hidden_size == 4 * m.hidden_size  # derived again
    assert m.num_query_groups == m.num_attention_heads  # derived again
    assert c.config.scheduler.lr_warmup_iters == 0  # derived: no fraction -> 0
    assert c.config.train.train_iters == 1000  # the schema default
    assert ("model", "ffn_hidden_size") not in c.tree.chains
    assert "derived: 4 * hidden_size" in c.explain("model.ffn_hidden_size")
    # unsetting a schema key that the recipe never set is a no-op, not an error
    assert build(DENSE, ["~model.kv_channels"]).fingerprint == base.fingerprint


def test_tilde_on_inherited_key(in_repo: Path) -> None:
    c = build(SMALL, ["~model.rotary_base"])  # set by the bundled _base/llama3
    assert c.config.model.rotary_base == 10000.0  # schema default, not Llama 3's 500000


@pytest.mark.parametrize(("text", "value"), [
    ("3e-4", 3e-4), ("100", 100), ("-1", -1), ("1_000", 1000), ("0x10", 16), ("true", True), ("false", False),
    ('["a","b"]', ["a", "b"]), ("[1, 2]", [1, 2]), ("foo", "foo"), ("a/b.txt", "a/b.txt"), ('"a b"', "a b"),
    ("'lit'", "lit"), ("{a = 1}", {"a": 1}), ("/abs/path", "/abs/path"), ("host:29500", "host:29500"),
    ("INFO", "INFO"), ("1.5", 1.5),
])
def test_values_parse_as_toml(text: str, value: object) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_toml_values_reach_the_config(in_repo: Path) -> None:
    c = build(SMALL, ["optimizer.lr=3e-4", 'data.paths=["a","b"]', "data.kind=indexed", "tokenizer.path=tok_dir",
                      "checkpoint.save=/tmp/ck/run1", 'description="two words"'])
    assert c.config.optimizer.lr == 3e-4 and isinstance(c.config.optimizer.lr, float)
    assert c.config.data.paths == ("a", "b") and c.config.data.kind == "indexed"
    assert c.config.tokenizer.path == "tok_dir"
    assert c.config.checkpoint.save == "/tmp/ck/run1"
    assert c.config.description == "two words"


def test_same_strings_from_python_and_cli(in_tmp: Path) -> None:
    overrides = ["train.train_iters=7", "+launch.env.X=1", "~optimizer.min_lr", "optimizer.lr=1e-3"]
    python = build(SMALL, overrides)
    result = CliRunner().invoke(main, ["build", str(SMALL), *overrides, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.output == python.to_json()


def test_compiled_override_revalidates(in_repo: Path) -> None:
    c = build(SMALL)
    d = c.override("train.train_iters=7", train={"seed": 3}, **{"optimizer.lr": 2e-3})
    assert (d.config.train.train_iters, d.config.train.seed, d.config.optimizer.lr) == (7, 3, 2e-3)
    assert c.config.train.train_iters == 50  # the original is frozen
    assert d.fingerprint != c.fingerprint
    assert d.tree.chains[("train", "train_iters")][-1].kind == "python"
    with pytest.raises(ValidationError, match="global_batch_size 9 is not divisible by micro_batch_size 2"):
        c.override("train.global_batch_size=9")
    with pytest.raises(TypeMismatchError, match=r"\[train\.seed\] expected an integer"):
        c.override(train={"seed": "x"})
    with pytest.raises(OverrideError):
        c.override("no value here")


def test_from_config_with_evolve_revalidates(in_repo: Path) -> None:
    c = build(SMALL)
    same = from_config(c.config, artifact_dir=c.artifact_dir)
    assert same.config == c.config and same.fingerprint == c.fingerprint
    evolved = attrs.evolve(c.config, train=attrs.evolve(c.config.train, train_iters=80))
    d = from_config(evolved, artifact_dir=c.artifact_dir)
    assert d.config.train.train_iters == 80
    broken = attrs.evolve(c.config, parallel=attrs.evolve(c.config.parallel, tensor_model_parallel_size=4))
    with pytest.raises(ValidationError, match="world size 2 .* is not divisible by tensor 4"):
        from_config(broken)
    with pytest.raises(RecipeError, match="num_query_groups 2 is not divisible by tensor_model_parallel_size 4"):
        from_config(broken)


def test_replace_whole_model_from_python(in_repo: Path) -> None:
    c = build(SMALL)
    small = c.override(model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=1000))
    m = small.config.model
    assert (m.num_layers, m.hidden_size, m.kv_channels, m.ffn_hidden_size) == (2, 64, 32, 256)  # re-derived
    assert m.rotary_base == 10000.0  # the recipe's Llama value is gone: the table was replaced wholesale
    assert small.plan.params_total < c.plan.params_total
    assert "Python (model)" in small.explain("model.num_layers")


def test_replace_whole_table_from_toml(in_tmp: Path) -> None:
    write(in_tmp / "swap.toml", "[model]\n_replace = true\nnum_layers = 2\nhidden_size = 64\nnum_attention_heads = 2\n"
                                "vocab_size = 1000\n")
    c = build(SMALL, overlays=["swap.toml"])
    m = c.config.model
    assert (m.num_layers, m.hidden_size, m.rotary_base, m.num_query_groups) == (2, 64, 10000.0, 2)
    assert ("model", "rotary_base") not in c.tree.chains
    # without _replace, the same overlay merges key by key
    write(in_tmp / "merge.toml", "[model]\nnum_layers = 2\n")
    assert build(SMALL, overlays=["merge.toml"]).config.model.rotary_base == 500000.0
    # and in a recipe file that extends a parent
    write(in_tmp / "child.toml", f'extends = "{SMALL.as_posix()}"\n[train]\n_replace = true\ntrain_iters = 10\n'
                                 "global_batch_size = 4\nmicro_batch_size = 2\n")
    t = build("child.toml").config.train
    assert (t.train_iters, t.eval_interval, t.global_batch_size) == (10, None, 4)


def test_explain_shows_provenance(in_tmp: Path) -> None:
    write(in_tmp / "o.toml", "[train]\ntrain_iters = 60\n")
    c = build(SMALL, ["train.train_iters=70"], overlays=["o.toml"])
    text = c.explain("train.train_iters")
    assert text.splitlines()[0] == "train.train_iters = 70"
    assert ("set by:  tests/compiler/data/mixins/cpu_short.toml:3, overridden by overlay o.toml:2, "
            "overridden by CLI 'train.train_iters=70'") in text
    assert "default: 1000" in text and "help:    Optimizer steps to run." in text
    assert 'allowed: "RMSNorm", "LayerNorm"' in c.explain("model.normalization")
    assert "set by:  default" in c.explain("train.seed") or "set by:  default" in c.explain("train.torch_compile")
    result = CliRunner().invoke(main, ["explain", str(SMALL), "model.kv_channels", "model.hidden_size=256"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("model.kv_channels = 64\n  set by:  derived: hidden_size / num_attention_heads")


def test_overrides_given_as_one_string(in_repo: Path) -> None:
    assert build(SMALL, "train.train_iters=9").config.train.train_iters == 9


def test_replace_in_a_mixin_replaces_its_extends_siblings(in_tmp: Path) -> None:
    write(in_tmp / "mixin.toml", "[train]\n_replace = true\nglobal_batch_size = 8\nmicro_batch_size = 1\n")
    write(in_tmp / "p.toml", f'extends = "{DENSE.as_posix()}"\n[train]\nseed = 7\n')
    write(in_tmp / "r.toml", 'extends = ["p", "mixin"]\n')
    t = build("r.toml").config.train
    assert (t.global_batch_size, t.seed) == (8, 1234)  # p.toml's seed = 7 is gone with its [train]
    write(in_tmp / "r2.toml", f'extends = ["{DENSE.as_posix()}", "mixin"]\n[train]\ntrain_iters = 30\n')
    assert build("r2.toml").config.train.train_iters == 30
