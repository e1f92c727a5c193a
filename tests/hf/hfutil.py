"""Tiny random Hugging Face models (built from configs, never downloaded) and Megatron helpers
shared by tests/hf and its torchrun script."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

_ATTN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             num_hidden_layers=2, vocab_size=256, rms_norm_eps=1e-6, max_position_embeddings=256,
             torch_dtype="float32")
# One tiny config per covered architecture (and variant): model_type + overrides.
ARCHS: dict[str, dict[str, Any]] = {
    "llama31": dict(model_type="llama", **{**_ATTN, "max_position_embeddings": 131072}, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama32": dict(model_type="llama", **{**_ATTN, "vocab_size": 250, "max_position_embeddings": 131072},
                    tie_word_embeddings=True,
                    rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama2": dict(model_type="llama", **_ATTN, rope_theta=10000.0),
    "qwen2": dict(model_type="qwen2", **{**_ATTN, "vocab_size": 250}, tie_word_embeddings=True,
                  rope_theta=1000000.0),
    "qwen3": dict(model_type="qwen3", **_ATTN, head_dim=32, rope_theta=1000000.0),
    "mistral": dict(model_type="mistral", **_ATTN, sliding_window=None, rope_theta=1000000.0),
    "mixtral": dict(model_type="mixtral", **{**_ATTN, "intermediate_size": 48}, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None, rope_theta=1000000.0),
    "qwen3_moe": dict(model_type="qwen3_moe", **_ATTN, head_dim=32, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1000000.0),
}

# What makes an imported recipe run as a tiny fp32 CPU job.
TINY_OVERLAY = textwrap.dedent("""\
    [model]
    seq_length = 32
    make_vocab_size_divisible_by = 64
    moe_token_dispatcher_type = "allgather"
    moe_grouped_gemm = false
    moe_aux_loss_coeff = 0.0

    [precision]
    dtype = "fp32"
    grad_reduce_in_fp32 = false

    [train]
    global_batch_size = 4
    micro_batch_size = 2
    train_iters = 3
    eval_interval = 1000
    eval_iters = 1

    [optimizer]
    overlap_grad_reduce = false
    overlap_param_gather = false

    [checkpoint]
    save_interval = 1000

    [launch]
    nodes = 1
    gpus_per_node = 1
    accelerator = "cpu"
""")


def make_hf_model(arch: str, directory: Path, seed: int = 0, dtype: str = "float32", **overrides: Any) -> Path:
    """Save a random tiny `arch` model (`dtype` safetensors + config.json) into directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**ARCHS[arch], **overrides, "torch_dtype": dtype}
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, dtype))
    with torch.no_grad():  # norms are ones at init: make them random so a mix-up shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


# The tiny tokenizer's special tokens, at ids none of transformers' defaults use (Llama's are 0/1/2).
SPECIAL_TOKENS = {"unk_token": ("<unk>", 250), "bos_token": ("<s>", 251), "eos_token": ("</s>", 252),
                  "pad_token": ("<pad>", 253)}


def make_tokenizer(directory: Path) -> Any:
    """Save a tiny word-level fast tokenizer (words w0..w249, then SPECIAL_TOKENS) into directory, built
    offline with `tokenizers`, as save_pretrained writes one (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)} | {text: i for text, i in SPECIAL_TOKENS.values()}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: text for k, (text, _) in SPECIAL_TOKENS.items()})
    tok.save_pretrained(directory)
    return tok


def write_recipe(hf_dir: Path, path: Path, extra: str = "") -> Path:
    """import-hf's recipe for hf_dir (next to `path`) and `path` extending it with the tiny-CPU overlay."""
    from recipec.compiler.hf_import import recipe_from_hf

    imported = path.with_name(path.stem + "_imported.toml")
    imported.write_text(recipe_from_hf(hf_dir, name=path.stem))
    path.write_text(f'extends = "{imported.name}"\nname = "{path.stem}"\n\n' + TINY_OVERLAY + extra)
    return path


def hf_logits(hf_dir: Path, tokens: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens(vocab: int, batch: int = 2, seq: int = 16, seed: int = 7) -> Any:
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_model(recipe: Path, overrides: tuple[str, ...] = ()) -> tuple[Any, Any, int]:
    """(model chunks, config, padded vocab) of a recipe on this process's model-parallel groups."""
    from recipec.compiler.api import build
    from recipec.runtime.model import build_model_chunks

    compiled = build(recipe, overrides)
    c = compiled.config
    padded = compiled.plan.padded_vocab_size
    chunks, _ = build_model_chunks(c, padded, on_gpu=False)
    for chunk in chunks:
        chunk.eval()
    return chunks, c, padded


def megatron_logits(model: Any, toks: Any) -> Any:
    """Full-vocabulary logits of a TP=1/PP=1 Megatron GPTModel."""
    import torch

    pos = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    with torch.no_grad():
        return model(toks, pos, None)


def ARCHS_VOCAB(hf_dir: Path) -> int:  # noqa: N802 - the vocab an HF dir's tokens are drawn from
    import json

    return int(json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"])


def free_port() -> int:
    """The tests' one free-port helper (tests/launch/launch_helpers.py), imported when first asked for."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "launch"))
    from launch_helpers import free_tcp_port

    return free_tcp_port()


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env
