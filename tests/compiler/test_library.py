"""The bundled recipe library: every recipe compiles, fits its GPUs, and counts its parameters right.

No torch: everything here is the compiler's own arithmetic.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache

import pytest
from click.testing import CliRunner

from recipec.compiler import build
from recipec.compiler.cli import main
from recipec.compiler.errors import RecipeError
from recipec.compiler.estimate import active_params, total_params
from recipec.compiler.hardware import ACCELERATORS
from recipec.compiler.loader import bundled_recipes, library_dir

RECIPES = bundled_recipes()
NAMES = [p.relative_to(library_dir()).with_suffix("").as_posix() for p in RECIPES]
H100_GIB = ACCELERATORS["H100-80GB"].memory_gib  # 79.1


@cache
def compiled(name: str):
    return build(name)


def model_file(name: str) -> str | None:
    """The `_models/<model>` building block a recipe extends (None for one without)."""
    data = tomllib.loads((library_dir() / f"{name}.toml").read_text())
    parents = data.get("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    found = [p.split("/", 1)[1] for p in parents if p.startswith("_models/")]
    return found[0] if found else None


# (a) + (c): every bundled recipe compiles and validates at its default node count, with a
# description, and its memory estimate fits the 80 GB H100 the defaults name.
@pytest.mark.parametrize("name", NAMES)
def test_bundled_recipe_compiles_and_fits(name: str) -> None:
    c = compiled(name)
    assert c.config.description, f"{name} has no description"
    assert c.plan.world_size == c.config.launch.nodes * c.config.launch.gpus_per_node
    if c.config.launch.accelerator != "cpu":
        assert c.config.launch.gpus_per_node == 8
        assert c.config.launch.accelerator == "H100-80GB"
        assert c.plan.memory_gib["total"] < H100_GIB, c.plan.memory_gib


def test_every_family_and_variant_is_present() -> None:
    names = set(NAMES)
    expected = {
        "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b", "llama31_8b", "llama31_70b",
        "llama31_405b", "llama32_1b", "llama32_3b", "qwen25_500m", "qwen25_1p5b", "qwen25_3b", "qwen25_7b",
        "qwen25_14b", "qwen25_32b", "qwen25_72b", "qwen3_600m", "qwen3_1p7b", "qwen3_4b", "qwen3_8b",
        "qwen3_14b", "qwen3_32b", "qwen3_30b_a3b", "qwen3_235b_a22b", "mistral_7b", "mixtral_8x7b",
        "mixtral_8x22b", "llama31_8b_128k", "llama31_70b_128k",
        "llama3_8b_sft", "llama3_8b_lora", "llama31_8b_sft", "llama31_8b_lora",
        "llama3_70b_sft", "llama3_70b_lora", "llama31_70b_sft", "llama31_70b_lora",
    }
    assert expected <= names, sorted(expected - names)
    for name in names:
        if name.endswith("_lora"):
            c = compiled(name)
            assert c.config.peft.method == "lora"
            assert c.config.data.kind == "sft" and c.config.tokenizer.type == "huggingface"
            assert c.config.checkpoint.pretrained
        if name.endswith("_sft"):
            c = compiled(name)
            assert c.config.peft.method is None
            assert c.config.data.kind == "sft" and c.config.tokenizer.type == "huggingface"
            assert c.config.checkpoint.pretrained
    assert compiled("llama31_8b_128k").config.model.seq_length == 131072
    assert compiled("llama31_8b_128k").config.parallel.context_parallel_size > 1


# (b) Published parameter counts, keyed by the `_models/` file. Exact figures are the
# safetensors totals shown on the Hugging Face model pages; the Qwen and Mistral AI
# figures are the rounded numbers of their model cards / announcements.
# Published counts use the tokenizer's vocabulary, so they are compared against
# total_params(model, model.vocab_size) (unpadded); plan.params_total (Megatron's padded
# vocabulary) is checked within 1% too.
PUBLISHED: dict[str, tuple[float, str]] = {
    "deepseek_v3": (671e9, "DeepSeek-V3: 671B total (main model; HF's 685B adds the 14B MTP module), model card"),
    "deepseek_v2_lite": (15.7e9, "DeepSeek-V2-Lite: 15.7B total, model card"),
    "gemma3_1b": (1_000e6, "Gemma 3 Technical Report Table 1: 302M embedding + 698M non-embedding"),
    "gemma3_4b": (3_884e6, "Gemma 3 Technical Report Table 1: 675M + 3,209M (text; 417M vision encoder excluded)"),
    "gemma3_12b": (11_771e6, "Gemma 3 Technical Report Table 1: 1,012M + 10,759M (text only)"),
    "gemma3_27b": (27_016e6, "Gemma 3 Technical Report Table 1: 1,416M + 25,600M (text only)"),
    "gpt_oss_20b": (20.91e9, "gpt-oss-20b: 20.91B total, OpenAI gpt-oss model card Table 1"),
    "gpt_oss_120b": (116.83e9, "gpt-oss-120b: 116.83B total, OpenAI gpt-oss model card Table 1"),
    "llama2_7b": (6_738_415_616, "Llama-2-7b-hf: 6,738,415,616, HF safetensors (6.74B)"),
    "llama2_13b": (13_015_864_320, "Llama-2-13b-hf: 13,015,864,320, HF safetensors (13.0B)"),
    "llama2_70b": (68_976_648_192, "Llama-2-70b-hf: 68,976,648,192, HF safetensors (69.0B)"),
    "llama3_8b": (8_030_261_248, "Meta-Llama-3-8B: 8,030,261,248, HF safetensors (8.03B)"),
    "llama3_70b": (70_553_706_496, "Meta-Llama-3-70B: 70,553,706,496, HF safetensors (70.6B)"),
    "llama31_8b": (8_030_261_248, "Llama-3.1-8B: 8,030,261,248, HF safetensors (8.03B)"),
    "llama31_70b": (70_553_706_496, "Llama-3.1-70B: 70,553,706,496, HF safetensors (70.6B)"),
    "llama31_405b": (405_853_388_800, "Llama-3.1-405B: 405,853,388,800, HF safetensors (406B)"),
    "llama32_1b": (1_235_814_400, "Llama-3.2-1B: 1,235,814,400, HF safetensors (1.24B, tied)"),
    "llama32_3b": (3_212_749_824, "Llama-3.2-3B: 3,212,749,824, HF safetensors (3.21B, tied)"),
    "qwen25_500m": (0.49e9, "Qwen2.5-0.5B: 0.49B, HF model card"),
    "qwen25_1p5b": (1.54e9, "Qwen2.5-1.5B: 1.54B, HF model card"),
    "qwen25_3b": (3.09e9, "Qwen2.5-3B: 3.09B, HF model card"),
    "qwen25_7b": (7.61e9, "Qwen2.5-7B: 7.61B, HF model card"),
    "qwen25_14b": (14.7e9, "Qwen2.5-14B: 14.7B, HF model card"),
    "qwen25_32b": (32.5e9, "Qwen2.5-32B: 32.5B, HF model card"),
    "qwen25_72b": (72.7e9, "Qwen2.5-72B: 72.7B, HF model card"),
    "qwen3_600m": (0.6e9, "Qwen3-0.6B: 0.6B, HF model card"),
    "qwen3_4b": (4.0e9, "Qwen3-4B: 4.0B, HF model card"),
    "qwen3_8b": (8.2e9, "Qwen3-8B: 8.2B, HF model card"),
    "qwen3_14b": (14.8e9, "Qwen3-14B: 14.8B, HF model card"),
    "qwen3_32b": (32.8e9, "Qwen3-32B: 32.8B, HF model card"),
    "qwen3_30b_a3b": (30.5e9, "Qwen3-30B-A3B: 30.5B total, HF model card"),
    "qwen3_235b_a22b": (235e9, "Qwen3-235B-A22B: 235B total, HF model card"),
    "mistral_7b": (7.25e9, "Mistral-7B-v0.3: 7.25B, HF model page"),
    "mixtral_8x7b": (46.7e9, "Mixtral-8x7B: 46.7B total, Mistral AI 'Mixtral of experts' post"),
    "mixtral_8x22b": (141e9, "Mixtral-8x22B: 141B total, Mistral AI 'Cheaper, Better, Faster, Stronger' post"),
}
# Qwen3-1.7B's card says "1.7B" (2 significant digits; our exact count 1.72B is 1.2% above it),
# so the card's other figure is used: "Non-Embedding: 1.4B" (total minus the tied embedding).
PUBLISHED_NON_EMBEDDING = {"qwen3_1p7b": (1.4e9, "Qwen3-1.7B: 1.4B non-embedding, HF model card")}
# Active parameters of the MoE models (routed experts counted top-k times).
PUBLISHED_ACTIVE: dict[str, tuple[float, float, str]] = {
    "deepseek_v3": (37e9, 0.02, "DeepSeek-V3: 37B activated, model card (ours 37.56B)"),
    "deepseek_v2_lite": (2.4e9 + 102400 * 2048, 0.025, "DeepSeek-V2-Lite: 2.4B activated, without the input embedding"),
    "mixtral_8x7b": (12.9e9, 0.01, "Mixtral-8x7B: 12.9B active, Mistral AI post"),
    "mixtral_8x22b": (39e9, 0.01, "Mixtral-8x22B: 39B active, Mistral AI post"),
    "qwen3_235b_a22b": (22e9, 0.01, "Qwen3-235B-A22B: 22B activated, HF model card"),
    # The card's "3.3B activated" is our 3.353B cut to one decimal (attention 18.9M + 8 of
    # 128 experts x 4.72M per layer, x 48, + 2 x 311M embeddings): 1.6% apart, hence 2%.
    "qwen3_30b_a3b": (3.3e9, 0.02, "Qwen3-30B-A3B: 3.3B activated, HF model card"),
    # The gpt-oss card's active counts leave out the 201088 x 2880 embedding table (0.58B) we count.
    "gpt_oss_20b": (3.61e9 + 201088 * 2880, 0.01, "gpt-oss-20b: 3.61B active + embedding, OpenAI model card"),
    "gpt_oss_120b": (5.13e9 + 201088 * 2880, 0.01, "gpt-oss-120b: 5.13B active + embedding, OpenAI model card"),
}
EXACT = {k for k, (v, _) in PUBLISHED.items() if v >= 1e9 and v % 1_000_000 != 0}
MODEL_RECIPES = sorted({m for m in map(model_file, NAMES) if m})


def test_every_model_has_a_published_count() -> None:
    assert set(MODEL_RECIPES) == set(PUBLISHED) | set(PUBLISHED_NON_EMBEDDING)
    assert {m for m in MODEL_RECIPES if compiled(m).config.model.is_moe} == set(PUBLISHED_ACTIVE)


@pytest.mark.parametrize("name", [n for n in NAMES if model_file(n)])
def test_parameter_count_matches_published(name: str) -> None:
    key = model_file(name)
    assert key is not None
    c = compiled(name)
    m = c.config.model
    unpadded = total_params(m, m.vocab_size)
    if key in PUBLISHED_NON_EMBEDDING:
        published, source = PUBLISHED_NON_EMBEDDING[key]
        embeddings = m.vocab_size * m.hidden_size * (1 if m.share_embeddings_and_output_weights else 2)
        assert abs(unpadded - embeddings - published) / published < 0.01, source
        return
    published, source = PUBLISHED[key]
    assert abs(unpadded - published) / published < 0.01, f"{name}: {unpadded:,} vs {source}"
    assert abs(c.plan.params_total - published) / published < 0.01, f"{name}: padded {c.plan.params_total:,} vs {source}"
    if key in EXACT:
        assert unpadded == published, f"{name}: {unpadded:,} vs {source}"
    if key in PUBLISHED_ACTIVE:
        active, tolerance, source = PUBLISHED_ACTIVE[key]
        assert abs(active_params(m, m.vocab_size) - active) / active < tolerance, source
        assert abs(c.plan.params_active - active) / active < tolerance, source
    else:
        assert c.plan.params_active == c.plan.params_total


# (c) A layout that cannot fit is refused with the estimate in GiB.
def test_too_small_layout_is_rejected_with_the_estimate() -> None:
    overrides = ["launch.nodes=1", "parallel.pipeline_model_parallel_size=1", "parallel.context_parallel_size=1"]
    with pytest.raises(RecipeError) as info:
        build("llama31_405b", overrides)
    message = str(info.value)
    assert "estimated memory per GPU" in message
    estimate = re.search(r"estimated memory per GPU ([\d.]+) GiB", message)
    assert estimate and float(estimate.group(1)) > H100_GIB
    assert "79.1 GiB" in message and "launch.nodes" in message


def test_default_layout_of_the_largest_recipe_fits() -> None:
    c = compiled("llama31_405b")
    assert c.plan.world_size == 576
    assert c.plan.memory_gib["total"] < H100_GIB


# (d) `recipec diff` shows exactly the keys that differ.
def test_diff_llama3_vs_llama31_shows_only_real_differences() -> None:
    result = CliRunner().invoke(main, ["diff", "llama3_8b", "llama31_8b"])
    assert result.exit_code == 0, result.output
    keys = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert keys == {"description", "model.max_position_embeddings", "model.rope_scaling"}, result.output
    assert '(unset)  ->  "llama3"' in result.output and "131072" in result.output
    for same in ("model.hidden_size", "model.rope_scaling_factor", "parallel.", "train.", "name"):
        assert not any(k.startswith(same) for k in keys)


def test_diff_sft_vs_lora_is_the_lora_mixin() -> None:
    result = CliRunner().invoke(main, ["diff", "llama3_8b_sft", "llama3_8b_lora"])
    assert result.exit_code == 0, result.output
    keys = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    # LoRA: the adapter, its lr, and TP 1 instead of full SFT's TP 2 (Megatron-Bridge's layouts);
    # ETP follows TP (derived). Nothing else of the shared finetune defaults differs.
    assert keys == {"description", "peft.method", "peft.lora_rank", "peft.lora_alpha", "optimizer.lr",
                    "parallel.tensor_model_parallel_size", "parallel.expert_tensor_parallel_size"}, result.output


# (e) `recipec list` shows every family with size, sequence length and nodes x GPUs.
def test_list_shows_every_recipe_by_family() -> None:
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "(broken)" not in out
    for family in ("llama2", "llama3", "llama31", "llama32", "qwen25", "qwen3", "mistral", "mixtral", "gpt_oss",
                   "gemma3", "deepseek_v2", "deepseek_v3"):
        assert re.search(rf"^{family}:$", out, re.M), family
    assert not re.search(r"^gpt:$", out, re.M), "GPT-OSS grouped under its name's first word"
    for name in NAMES:
        c = compiled(name)
        row = re.search(rf"^  {re.escape(name)}\s+([\d.]+)([MB])\s+seq (\d+)\s+(\d+) x (\d+)\s", out, re.M)
        assert row, f"{name} missing from `recipec list`"
        assert int(row.group(3)) == c.config.model.seq_length
        assert (int(row.group(4)), int(row.group(5))) == (c.config.launch.nodes, c.config.launch.gpus_per_node)
        unit = 1e9 if row.group(2) == "B" else 1e6
        size = float(row.group(1)) * unit
        # `list` prints 2 decimals of B or 1 of M: allow that rounding as well as 1%.
        slack = max(0.01 * c.plan.params_total, (0.005 if unit == 1e9 else 0.05) * unit)
        assert abs(size - c.plan.params_total) <= slack, (name, row.group(0))


# The building blocks compose: each precision mixin on llama3_8b_fp8 (whose layout leaves room for
# the FP8 weight copies), each data mixin on llama3_8b, each parallel preset on
# a recipe of the size it is meant for, and the preset's [parallel] replaces the parent's.
BLOCKS = {
    "_mixins/bf16": "llama3_8b_fp8", "_mixins/fp8_delayed": "llama3_8b_fp8", "_mixins/fp8_current": "llama3_8b_fp8",
    "_mixins/fp8_blockwise": "llama3_8b_fp8", "_mixins/mxfp8": "llama3_8b_fp8", "_mixins/cuda_graph": "llama32_1b", "_mixins/lora": "llama3_8b_sft",
    "_data/mock": "llama3_8b_sft", "_data/indexed_blend": "llama3_8b", "_data/sft_jsonl": "llama3_8b",
    "_parallel/tp1": "llama32_1b", "_parallel/tp2": "llama3_8b", "_parallel/tp2_sp": "qwen25_7b",
    "_parallel/tp4_sp": "qwen25_14b", "_parallel/tp8": "llama3_70b_lora", "_parallel/tp8_sp": "qwen3_14b",
    "_parallel/tp8_pp4": "llama3_70b_sft", "_parallel/tp4_pp4_vpp5_cp2": "llama3_70b",
}


def test_every_building_block_is_exercised() -> None:
    root = library_dir()
    blocks = {p.relative_to(root).with_suffix("").as_posix() for p in root.glob("_*/*.toml")}
    assert {b for b in blocks if b.split("/")[0] in ("_mixins", "_data", "_parallel")} == set(BLOCKS)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_building_block_composes(block: str, tmp_path) -> None:
    recipe = tmp_path / "variant.toml"
    recipe.write_text(f'extends = ["{BLOCKS[block]}", "{block}"]\ndescription = "variant"\n')
    c = build(recipe)
    assert c.plan.memory_gib["total"] < H100_GIB
    own = tomllib.loads((library_dir() / f"{block}.toml").read_text())
    for section, values in own.items():
        if section == "extends":
            continue
        for key, value in values.items():
            if key != "_replace":
                assert getattr(getattr(c.config, section), key) == (tuple(value) if isinstance(value, list) else value)


# `_replace = true` in a mixin that comes later in `extends` replaces the table that the
# earlier entries built (bf16 after an FP8 recipe clears fp8; a parallel preset clears CP).


def test_bf16_mixin_replaces_an_fp8_parent(tmp_path) -> None:
    recipe = tmp_path / "variant.toml"
    recipe.write_text('extends = ["llama3_8b_fp8", "_mixins/bf16"]\ndescription = "variant"\n')
    assert build(recipe).config.precision.fp8 is None


def test_parallel_preset_replaces_the_parent_layout(tmp_path) -> None:
    recipe = tmp_path / "variant.toml"
    recipe.write_text('extends = ["llama3_8b", "_parallel/tp2"]\ndescription = "variant"\n')
    assert build(recipe).config.parallel.context_parallel_size == 1
