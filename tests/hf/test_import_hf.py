"""`recipec import-hf`: config.json -> recipe, pure Python (no torch, no transformers)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from hfutil import ARCHS, REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipec.compiler.api import build
from recipec.compiler.cli import main
from recipec.compiler.errors import RecipeError
from recipec.compiler.hf_import import HFImportError, hf_config, recipe_from_hf
from recipec.compiler.schema import ModelConfig

FAMILY = {"llama31": ("llama", "_base/llama31"), "llama32": ("llama", "_base/llama32"),
          "llama2": ("llama", "_base/llama2"), "qwen2": ("qwen2", "_base/qwen25"), "qwen3": ("qwen3", "_base/qwen3"),
          "mistral": ("mistral", "_base/mistral"), "mixtral": ("mixtral", "_base/mixtral"),
          "qwen3_moe": ("qwen3_moe", "_base/qwen3_moe")}


def _config_dir(tmp_path: Path, arch: str, **changes) -> Path:
    """A directory with only a config.json (what transformers would write, v4 spelling)."""
    cfg = {**{k: v for k, v in ARCHS[arch].items() if k != "torch_dtype"}, **changes}
    d = tmp_path / arch
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_field_is_mapped_and_compiles(tmp_path: Path, arch: str) -> None:
    d = _config_dir(tmp_path, arch)
    (tmp_path / "r.toml").write_text(recipe_from_hf(d))
    m = build(tmp_path / "r.toml").config.model
    cfg = ARCHS[arch]
    family, base = FAMILY[arch]
    assert f'"{base}"' in recipe_from_hf(d) and '"_base/pretrain"' in recipe_from_hf(d)
    assert m.architecture == family
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (2, 64, cfg["intermediate_size"])
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels) == (4, 2, cfg.get("head_dim", 16))
    assert m.vocab_size == cfg["vocab_size"] and m.norm_epsilon == cfg["rms_norm_eps"]
    assert m.rotary_base == cfg["rope_theta"]
    assert m.share_embeddings_and_output_weights == cfg.get("tie_word_embeddings", False)
    assert m.qk_layernorm == (family in ("qwen3", "qwen3_moe"))
    assert m.add_qkv_bias == (family == "qwen2") and not m.add_bias_linear
    if "rope_scaling" in cfg:
        assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", cfg["rope_scaling"]["factor"])
    else:
        assert m.rope_scaling is None
    if family in ("mixtral", "qwen3_moe"):
        assert m.num_moe_experts == 4 and m.moe_router_topk == 2
        assert m.moe_ffn_hidden_size == cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    else:
        assert m.num_moe_experts is None
    # ... and back: the config.json export describes the same model.
    back = hf_config(m)
    assert back["model_type"] == cfg["model_type"] and back["num_key_value_heads"] == 2


def test_transformers5_rope_parameters_are_read(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, "llama2", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    (tmp_path / "r.toml").write_text(recipe_from_hf(d))
    m = build(tmp_path / "r.toml").config.model
    assert (m.rotary_base, m.rope_scaling, m.rope_scaling_factor) == (1e6, "linear", 2.0)


@pytest.mark.parametrize("arch, changes, field", [
    ("mistral", {"sliding_window": 4096}, "config.json:sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096}, "config.json:use_sliding_window"),
    ("llama2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json:rope_scaling.rope_type"),
    ("llama31", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "config.json:rope_scaling.low_freq_factor"),
    ("llama2", {"attention_bias": True}, "config.json:attention_bias"),
    ("llama2", {"mlp_bias": True}, "config.json:mlp_bias"),
    ("llama2", {"hidden_act": "gelu_pytorch_tanh"}, "config.json:hidden_act"),
    ("llama2", {"model_type": "gpt_neox"}, "config.json:model_type"),
    ("qwen3_moe", {"norm_topk_prob": False}, "config.json:norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "config.json:mlp_only_layers"),
])
def test_unsupported_config_fails_naming_the_field(tmp_path: Path, arch: str, changes: dict, field: str) -> None:
    d = _config_dir(tmp_path, arch, **changes)
    with pytest.raises(RecipeError) as err:
        recipe_from_hf(d)
    assert f"[{field}]" in str(err.value)
    result = CliRunner().invoke(main, ["import-hf", str(d)])
    assert result.exit_code == 2 and field in result.output and "Traceback" not in result.output


def test_cli_writes_recipe_and_notes_tokenizer(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, "qwen2")
    (d / "tokenizer.json").write_text("{}")
    out = tmp_path / "imported.toml"
    result = CliRunner().invoke(main, ["import-hf", str(d), "-o", str(out), "--base", "finetune"])
    assert result.exit_code == 0, result.output
    c = build(out).config
    assert c.name == "imported"
    assert (c.tokenizer.type, c.tokenizer.path) == ("huggingface", str(d.resolve()))
    assert c.checkpoint.pretrained == str(d.resolve())


def test_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["import-hf", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_compiler_never_imports_the_runtime() -> None:
    code = ("import sys; import recipec.compiler.cli, recipec.compiler.hf_import; "
            "bad = [m for m in ('torch', 'transformers', 'megatron', 'recipec.runtime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- config.json is data from anywhere (issue 11): wrong types, absurd values and payload strings
# give a recipe that compiles or an HFImportError naming the field, never a traceback, and never
# a TOML key that config.json did not ask for.

HF_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
EXTRA_FIELDS = ["architectures", "head_dim", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                "sliding_window", "use_sliding_window", "layer_types", "attention_bias", "mlp_bias",
                "tie_word_embeddings", "hidden_act", "attention_dropout", "num_local_experts", "num_experts",
                "router_jitter_noise", "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                "max_position_embeddings", "rms_norm_eps", "norm_topk_prob", "router_aux_loss_coef", "dtype",
                "torch_dtype"]
PAYLOADS = ['x"\n[launch.env]\nLD_PRELOAD = "/tmp/x.so"\n#', "x\n[[model]]\n", '"""', "''']]", "]]\n[train]\ntrain_iters = 1",
            "\r\nname = \"evil\"", "\x00\x1b[2J\u2028\u0085", "$(touch /tmp/pwned)"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 5000),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(PAYLOADS),
                         st.sampled_from(["silu", "gelu", "llama3", "linear", "full_attention", "yes", "abc"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta",
                                                                   "original_max_position_embeddings", "x"]),
                                                  inner, max_size=4)), max_leaves=6)


def _model_dir(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def _import_or_error(d: Path, **kwargs) -> str | None:
    """The recipe text, after checking it compiles; None when import-hf refused the config."""
    try:
        text = recipe_from_hf(d, **kwargs)
    except HFImportError as exc:
        assert all(p.key for p in exc.problems) and str(exc)
        return None
    recipe = d.parent / "imported.toml"
    recipe.write_text(text)
    build(recipe, artifact_dir=str(d.parent / "build"))
    return text


def _keys_are_only_what_config_json_gave(text: str, *, tokenizer: bool, finetune: bool = False,
                                         name: bool = False) -> dict:
    data = tomllib.loads(text)
    expected = {"extends", "model", "precision"} | ({"tokenizer"} if tokenizer else set()) | ({"checkpoint"} if finetune else set()) \
        | ({"name"} if name else set())
    assert set(data) == expected, set(data)
    assert set(data["model"]) <= {f.name for f in attrs.fields(ModelConfig)}
    assert all(not isinstance(v, dict) for v in data["model"].values())
    assert data["precision"] in ({"dtype": "fp32"}, {"dtype": "bf16"}, {"dtype": "fp16"})
    return data


@HF_SETTINGS
@given(st.sampled_from(sorted(ARCHS)), st.sampled_from(sorted({k for a in ARCHS.values() for k in a} | set(EXTRA_FIELDS))),
       json_values)
def test_any_json_value_in_any_field_imports_or_is_an_hf_import_error(tmp_path_factory, arch: str, field: str,
                                                                       value) -> None:
    cfg = {**ARCHS[arch], field: value}
    d = _model_dir(tmp_path_factory.mktemp("hf"), cfg)
    text = _import_or_error(d)
    if text is not None:
        _keys_are_only_what_config_json_gave(text, tokenizer=False)
    result = CliRunner().invoke(main, ["import-hf", str(d)])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@HF_SETTINGS
@given(st.sampled_from(PAYLOADS) | st.text(min_size=1, max_size=30), st.sampled_from(["llama2", "qwen2", "mixtral"]),
       st.booleans())
def test_payload_strings_never_become_toml_keys(tmp_path_factory, payload: str, arch: str, finetune: bool) -> None:
    """A payload in `architectures` (a comment) and in the directory name (a comment and two string
    values) is written escaped: the recipe has exactly the keys import-hf writes, and the values."""
    root = tmp_path_factory.mktemp("hf")
    try:
        d = _model_dir(root / payload.replace("/", "_").replace("\x00", "_")[:100], {**ARCHS[arch],
                                                                                      "architectures": [payload]})
    except (OSError, ValueError):  # a name the file system refuses
        d = _model_dir(root / "plain", {**ARCHS[arch], "architectures": [payload]})
    (d / "tokenizer.json").write_text("{}")
    text = _import_or_error(d, base="finetune" if finetune else "pretrain")
    assert text is not None
    data = _keys_are_only_what_config_json_gave(text, tokenizer=True, finetune=finetune)
    assert data["tokenizer"]["path"] == str(d.resolve())
    assert not finetune or data["checkpoint"]["pretrained"] == str(d.resolve())
    assert all(not line or line.startswith(("#", "[")) or "=" in line for line in text.splitlines())


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": "abc"}, "hidden_size"), ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"rope_scaling": "yes"}, "rope_scaling"), ({"architectures": []}, "architectures"),
    ({"architectures": [1]}, "architectures"), ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"vocab_size": -1}, "vocab_size"), ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"hidden_act": ["silu"]}, "hidden_act"), ({"model_type": {"x": 1}}, "model_type"),
    ({"num_hidden_layers": 2**63 - 1}, "num_hidden_layers"), ({"rope_theta": float("inf")}, "rope_theta"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_wrong_typed_or_absurd_fields_name_the_field(tmp_path: Path, changes: dict, field: str) -> None:
    d = _config_dir(tmp_path, "llama2", **changes)
    with pytest.raises(HFImportError) as err:
        recipe_from_hf(d)
    assert f"[config.json:{field}]" in str(err.value)
    result = CliRunner().invoke(main, ["import-hf", str(d)])
    assert result.exit_code == 2 and f"config.json:{field}" in result.output and "Traceback" not in result.output


def test_unreadable_config_json_is_an_hf_import_error(tmp_path: Path) -> None:
    for name, body in [("binary", b"\xff\xfe\x00"), ("deep", b"[" * 100_000 + b"]" * 100_000), ("list", b"[1]"),
                       ("digits", b'{"hidden_size": ' + b"9" * 5000 + b"}")]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes(body)
        result = CliRunner().invoke(main, ["import-hf", str(d)])
        assert result.exit_code == 2 and "Traceback" not in result.output, (name, result.output)


def test_import_hf_out_must_be_a_toml_file(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, "llama2")
    for out in [str(tmp_path / "recipe"), str(tmp_path)]:
        result = CliRunner().invoke(main, ["import-hf", str(d), "-o", out])
        assert result.exit_code == 2 and "must name a .toml file" in result.output


# --- precision.dtype is the weights' dtype (issue 14 item 6): the README's convert commands with the
# imported recipe give back the same bits. Was: the base's bf16, whatever the weights were.

@pytest.mark.parametrize("fields, dtype", [
    ({"dtype": "float32"}, "fp32"), ({"dtype": "bfloat16"}, "bf16"), ({"dtype": "float16"}, "fp16"),
    ({"torch_dtype": "bfloat16"}, "bf16"), ({"torch_dtype": "float32"}, "fp32"), ({"torch_dtype": "half"}, "fp16"),
    ({"dtype": "bfloat16", "torch_dtype": "bfloat16"}, "bf16"), ({"dtype": "float", "torch_dtype": "float32"}, "fp32"),
    ({"dtype": None, "torch_dtype": "bfloat16"}, "bf16"),
    ({}, "fp32"),  # no dtype: transformers loads the model in float32
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_precision_dtype_is_the_weights_dtype(tmp_path: Path, fields: dict, dtype: str) -> None:
    d = _config_dir(tmp_path, "llama2", **fields)
    for base in ("pretrain", "finetune"):  # the finetune base sets bf16 itself: the recipe's own value wins
        (tmp_path / "r.toml").write_text(recipe_from_hf(d, base=base))
        assert build(tmp_path / "r.toml").config.precision.dtype == dtype
    text = recipe_from_hf(d)
    assert "so `recipec convert` both ways is bit-exact" in text
    assert ("transformers loads such a model in float32" in text) == (not any(fields.values()))


@pytest.mark.parametrize("fields, field", [
    ({"dtype": "float64"}, "dtype"), ({"torch_dtype": "auto"}, "torch_dtype"), ({"dtype": "torch.bfloat16"}, "dtype"),
    ({"dtype": 16}, "dtype"), ({"dtype": {"text_config": "bfloat16"}}, "dtype"), ({"torch_dtype": ["float32"]}, "torch_dtype"),
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "dtype"), ({"dtype": 'bf16"\n[launch.env]\nX = "1'}, "dtype"),
])
def test_odd_dtype_is_an_hf_import_error_naming_the_field(tmp_path: Path, fields: dict, field: str) -> None:
    d = _config_dir(tmp_path, "llama2", **fields)
    with pytest.raises(HFImportError) as err:
        recipe_from_hf(d)
    assert f"[config.json:{field}]" in str(err.value)
    assert "float32" in str(err.value) or "disagree" in str(err.value)
    result = CliRunner().invoke(main, ["import-hf", str(d)])
    assert result.exit_code == 2 and f"config.json:{field}" in result.output and "Traceback" not in result.output


def test_export_config_carries_dtype_and_token_ids() -> None:
    from recipec.compiler.hf_import import model_fields

    m = ModelConfig(**model_fields({k: v for k, v in ARCHS["llama2"].items()})[0])
    cfg = hf_config(m, dtype="bfloat16", token_ids={"bos_token_id": 1, "eos_token_id": 2})
    assert (cfg["dtype"], cfg["torch_dtype"], cfg["bos_token_id"], cfg["eos_token_id"]) == ("bfloat16", "bfloat16", 1, 2)
    assert "pad_token_id" not in cfg
    with pytest.raises(HFImportError, match="float64"):
        hf_config(m, dtype="float64")
