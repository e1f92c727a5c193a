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
family (deepseek_v3, deepseek_v2, gemma3, gpt_oss), DeepSeek with plain RoPE, and qwen3 as a control;
~20 s a family on 2 cores, ~2 min in all. What a new user still meets is marked xfail(strict) in KNOWN.

Found this way and fixed in the families' own files: transformers builds DeepSeek's q/kv latent norms
with eps 1e-6 whatever rms_norm_eps says (runtime/families/deepseek.py: post_build); import-hf kept the
family base's YaRN / q LoRA / window where config.json has none (now refused, last test here).
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
# DeepSeek as the V2 paper's RoPE, without YaRN (transformers' "default" rope_type).
NEVER_SEEN["deepseek_v2_plain_rope"] = {**NEVER_SEEN["deepseek_v2"],
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 30000.0}}

# What a new user still meets (each strict: the day it passes, remove the mark). See the report of issue 12.
KNOWN = {
    "deepseek_v2_plain_rope": "import-hf exits 2 (compiler/families/deepseek.py refuses it): the DeepSeek base "
    "recipes set YaRN and an imported recipe cannot unset a key, so the import used to keep the base's YaRN "
    "(logits off by 5e-3). Fix: _base/deepseek_v*.toml leave RoPE scaling to recipes_toml/_models/.",
}


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


# A config whose feature the family's base recipe sets and an imported recipe cannot unset: import-hf used
# to keep the base's value (wrong logits, no message); now one message naming the field, exit 2.
BASE_LEAKS = {
    "deepseek_v3_without_q_lora": ("deepseek_v3", {"q_lora_rank": None}, "q_lora_rank"),
    "deepseek_v2_plain_rope": ("deepseek_v2_plain_rope", {}, "rope_parameters.rope_type"),
    "gpt_oss_plain_rope": ("gpt_oss", {"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}},
                           "rope_parameters.rope_type"),
    "gpt_oss_without_windows": ("gpt_oss", {"layer_types": ["full_attention"] * 3}, "layer_types"),
}


@pytest.mark.parametrize("leak", list(BASE_LEAKS))
def test_import_refuses_what_the_base_recipe_would_override(tmp_path: Path, leak: str) -> None:
    import json

    case, change, field = BASE_LEAKS[leak]
    cfg = {**NEVER_SEEN[case], **change, "dtype": "float32"}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "import-hf", "./hf", "-o", "r.toml"],
                          cwd=tmp_path, env=hfutil.clean_env(), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"[config.json:{field}]" in proc.stderr and "cannot unset" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.toml").exists()
