"""Each model family tried as a new user tries it (issue 12): a tiny random HF checkpoint this project has
never seen (config sizes and values unlike the family tests': other head / layer / expert counts,
vocabularies, RoPE thetas and windows), saved by transformers' `save_pretrained` (fp32 safetensors), then
only `recipec` processes in a fresh directory:

    recipec import-hf ./hf -o r.toml
    recipec build r.toml
    recipec convert hf-to-mcore ./hf --recipe r.toml -o ck
    recipec convert verify ck ./hf --recipe r.toml        (max |diff| < 1e-5, printed)
    recipec convert mcore-to-hf ck --recipe r.toml -o out

and `out` holds the same tensor names with the same bits, and transformers loads it. One param per new
family (deepseek_v3, deepseek_v2, gemma3, gpt_oss), what the family bases used to force on an import
(DeepSeek with plain RoPE, DeepSeek-V3 without q LoRA, GPT-OSS with plain RoPE and no window), and qwen3
as a control; ~20-55 s a case on 2 cores, ~5 min in all. What a new user still meets is marked
xfail(strict) in KNOWN.

Found this way and fixed in the families' own files: transformers builds DeepSeek's q/kv latent norms
with eps 1e-6 whatever rms_norm_eps says (runtime/families/deepseek.py: post_build); import-hf kept the
family base's YaRN / q LoRA / window where config.json has none (first refused; now the bases leave
those keys to recipes_toml/_models/, and the last test here checks the imported recipe resolves without them).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil

TOL = 1e-5

# case -> model_type + config kwargs. Every value here differs from tests/hf/hfutil.ARCHS and the family tests.
NEVER_SEEN: dict[str, dict[str, Any]] = {
    "qwen3": {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                  "intermediate_size": 80, "num_hidden_layers": 3, "vocab_size": 320, "rms_norm_eps": 1e-5,
                  "max_position_embeddings": 512, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
    "deepseek_v3": {
        "model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 112, "moe_intermediate_size": 24, "num_hidden_layers": 4, "first_k_dense_replace": 2,
        "n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 2,
        "routed_scaling_factor": 1.5, "kv_lora_rank": 24, "q_lora_rank": 40, "qk_rope_head_dim": 4, "qk_nope_head_dim": 12,
        "v_head_dim": 20, "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 2.0,
                         "original_max_position_embeddings": 128, "beta_fast": 16.0, "beta_slow": 2.0,
                         "mscale": 0.8, "mscale_all_dim": 0.8}},
    "deepseek_v2": {
        "model_type": "deepseek_v2", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 8,
        "intermediate_size": 72, "moe_intermediate_size": 20, "num_hidden_layers": 2, "first_k_dense_replace": 1,
        "n_routed_experts": 5, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "norm_topk_prob": False, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "vocab_size": 200, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "yarn", "rope_theta": 30000.0, "factor": 8.0,
                                             "original_max_position_embeddings": 32, "beta_fast": 24.0,
                                             "beta_slow": 1.0, "mscale": 0.6, "mscale_all_dim": 0.6}},
    "gemma3_text": {
        "model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 48,
        "intermediate_size": 80, "num_hidden_layers": 3, "vocab_size": 384, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "sliding_window": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "query_pre_attn_scalar": 40,
        "rope_theta": 20000.0, "rope_local_base_freq": 500.0},
    "gpt_oss": {
        "model_type": "gpt_oss", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
        "intermediate_size": 40, "num_hidden_layers": 3, "vocab_size": 288, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "num_local_experts": 6, "num_experts_per_tok": 3, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "swiglu_limit": 2.0,
        "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "beta_fast": 16.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 128, "rope_theta": 40000.0}},
}
# What the family bases used to set and an imported recipe could not unset (see the last test here).
# DeepSeek as the V2 paper's RoPE, without YaRN (transformers' "default" rope_type).
NEVER_SEEN["deepseek_v2_plain_rope"] = {**NEVER_SEEN["deepseek_v2"],
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 30000.0}}
# DeepSeek-V3 projecting its queries at full rank (the V3 base used to set q_lora_rank 1536), plain RoPE.
NEVER_SEEN["deepseek_v3_no_q_lora"] = {**NEVER_SEEN["deepseek_v3"], "q_lora_rank": None,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}
# GPT-OSS with full attention on every layer and plain RoPE (the base used to set a window and YaRN).
NEVER_SEEN["gpt_oss_full_attention_plain_rope"] = {
    **NEVER_SEEN["gpt_oss"], "layer_types": ["full_attention"] * 3,
    "rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}}

# What a new user still meets (each strict: the day it passes, remove the mark). See the report of issue 12.
KNOWN: dict[str, str] = {}


def _save_hf(case: str, directory: Path) -> Path:
    """A random tiny checkpoint, as a user would get one from `save_pretrained` (fp32 safetensors).
    Norm weights, biases and DeepSeek's expert-score bias are made random (their init is constant, which
    would hide a mix-up)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(NEVER_SEEN[case])
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, **kw, dtype="float32")
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    zero_centred = model_type == "gemma3_text"  # Gemma's norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if zero_centred else 1.0) + 0.2 * torch.randn_like(p))
            elif p.dim() == 1 or "bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _recipec(cwd: Path, *args: str) -> str:
    """One `recipec` command as a user types it; asserts exit 0 and returns stdout + stderr."""
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", *args], cwd=cwd, env=hfutil.clean_env(),
                          capture_output=True, text=True, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"recipec {' '.join(args)} -> exit {proc.returncode}:\n{out[-4000:]}"
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


_MAX_DIFF = re.compile(r"^\s*max \|diff\|:\s*(\S+)$", re.MULTILINE)


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=KNOWN[case]))
                                  if case in KNOWN else case for case in NEVER_SEEN])
def test_a_new_users_checkpoint_goes_through_every_command(tmp_path: Path, case: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = _save_hf(case, tmp_path / "hf")
    assert list(hf.glob("*.safetensors")) and not list(hf.glob("*.bin"))
    _recipec(tmp_path, "import-hf", "./hf", "-o", "r.toml")
    _recipec(tmp_path, "build", "r.toml")
    _recipec(tmp_path, "convert", "hf-to-mcore", "./hf", "--recipe", "r.toml", "-o", "ck")
    # verify and the way back do not depend on each other: a failure of one still lets the other be seen
    problems = []
    try:
        verify = _recipec(tmp_path, "convert", "verify", "ck", "./hf", "--recipe", "r.toml")
        diffs = [float(d) for d in _MAX_DIFF.findall(verify)]
        if not diffs or max(diffs) >= TOL:
            problems.append(f"convert verify: max |diff| not < {TOL}:\n{verify[-2000:]}")
    except AssertionError as exc:
        problems.append(str(exc))
    _recipec(tmp_path, "convert", "mcore-to-hf", "ck", "--recipe", "r.toml", "-o", "out")

    a, b = _tensors(hf), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == NEVER_SEEN[case]["model_type"] and model.dtype == torch.float32
    assert not problems, "\n".join(problems)


# A config without a feature the family's base recipe used to set (YaRN, q LoRA, a window): import-hf once
# kept the base's value (wrong logits, no message), then refused it; now the bases leave those keys to
# recipes_toml/_models/ and the imported recipe resolves to what config.json says. Compile only (~1 s each).
UNSET = {
    "deepseek_v3_without_q_lora": ("deepseek_v3", {"q_lora_rank": None}, {"q_lora_rank": None}),
    # no q_lora_rank key at all: transformers' DeepseekV3Config default, 1536
    "deepseek_v3_default_q_lora": ("deepseek_v3", {"q_lora_rank": ...}, {"q_lora_rank": 1536}),
    "deepseek_v2_plain_rope": ("deepseek_v2_plain_rope", {}, {
        "rope_scaling": None, "rope_mscale": 1.0, "rope_mscale_all_dim": 0.0, "rotary_base": 30000.0}),
    "gpt_oss_plain_rope": ("gpt_oss", {"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}},
                           {"rope_scaling": None, "rotary_base": 40000.0, "window_size": 7}),
    "gpt_oss_without_windows": ("gpt_oss", {"layer_types": ["full_attention"] * 3},
                                {"window_size": None, "window_attn_skip_freq": None, "rope_scaling": "yarn"}),
    # every layer sliding: no window_attn_skip_freq (the base used to set 2)
    "gpt_oss_only_windows": ("gpt_oss", {"layer_types": ["sliding_attention"] * 3},
                             {"window_size": 7, "window_attn_skip_freq": None}),
}


@pytest.mark.parametrize("case", list(UNSET))
def test_import_resolves_without_what_the_base_recipe_used_to_set(tmp_path: Path, case: str) -> None:
    import json

    from recipec.compiler import build
    from recipec.compiler.hf_import import recipe_from_hf

    source, change, want = UNSET[case]
    cfg = {**NEVER_SEEN[source], **change, "dtype": "float32"}
    cfg = {k: v for k, v in cfg.items() if v is not ...}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "r.toml").write_text(recipe_from_hf(tmp_path))
    model = build(str(tmp_path / "r.toml")).config.model
    assert {k: getattr(model, k) for k in want} == want
