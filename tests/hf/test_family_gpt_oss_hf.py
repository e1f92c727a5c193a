"""GPT-OSS on CPU: a tiny random GptOssForCausalLM (built from transformers' own config class, never
downloaded), `recipec import-hf` of its config.json, then Megatron's logits against transformers'.

The tiny model exercises every GPT-OSS piece: sinks (random, so the softmax offset matters), an
alternating 4-token window over 16-token sequences, biases everywhere (the experts' too), YaRN over
64 original positions with truncate = false, 4 experts top-2 with router bias, and a SwiGLU clamp
small enough (0.3) that it cuts real activations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil

TOL = 1e-5
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 48, "num_hidden_layers": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
        "swiglu_limit": 0.3,
        "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0}}


def make_gpt_oss(directory: Path, seed: int = 0) -> Path:
    """A random tiny GptOssForCausalLM saved as fp32 safetensors: every 1-D weight and every bias
    random (HF initialises expert biases to zero, which would hide a mapping mix-up)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**TINY, dtype="float32"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1 or "bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    hf = make_gpt_oss(root / "hf")
    return hf, hfutil.write_recipe(hf, root / "gpt_oss.toml")


def _stacked_get(hf: Path):
    """HF tensor reader that understands the table's `X[i]` (expert i of stacked tensor X)."""
    from safetensors import safe_open

    f = safe_open(str(hf / "model.safetensors"), framework="pt")

    def get(name: str) -> torch.Tensor:
        base, _, index = name.partition("[")
        return f.get_slice(base)[int(index[:-1])] if index else f.get_tensor(base)
    return get


def _logits_via_table(recipe: Path, hf: Path, toks: torch.Tensor, overrides: tuple[str, ...] = ()) -> torch.Tensor:
    """The recipe's Megatron model (as the runtime builds it) filled through the family's weight table."""
    from recipec.runtime.hf.convert import model_shape
    from recipec.runtime.hf.mappings import ArchMapping

    chunks, c, padded = hfutil.megatron_model(recipe, overrides)
    (model,) = chunks
    mapping, get = ArchMapping("gpt_oss", model_shape(c, padded)), _stacked_get(hf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(mapping.to_mcore(name, get))
    return hfutil.megatron_logits(model, toks)[..., : hf_vocab()]


def hf_vocab() -> int:
    return int(TINY["vocab_size"])


def test_imported_recipe_maps_every_gpt_oss_feature(tiny) -> None:
    _, recipe = tiny
    from recipec.compiler.api import build

    m = build(recipe).config.model
    assert (m.architecture, m.softmax_type, m.window_size, m.window_attn_skip_freq) == ("gpt_oss", "learnable", 3, 2)
    assert (m.activation, m.glu_linear_offset, m.activation_func_clamp_value) == ("quick_gelu", 1.0, 0.3)
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_position_embeddings, m.rope_yarn_truncate) \
        == ("yarn", 32.0, 64, False)
    assert m.add_bias_linear and not m.moe_router_pre_softmax and m.num_moe_experts == 4


def test_logits_match_transformers(tiny, mcore_tp1) -> None:
    """TP=1: the family table + the generic [model] mapping reproduce transformers' logits; and each
    GPT-OSS feature is load-bearing (the window off by one, or YaRN truncated, moves the logits)."""
    hf, recipe = tiny
    toks = hfutil.tokens(hf_vocab())
    ref = hfutil.hf_logits(hf, toks)
    assert ref.std() > 0.01
    assert (_logits_via_table(recipe, hf, toks) - ref).abs().max().item() < TOL
    for wrong in ("model.window_size=4", "model.rope_yarn_truncate=true"):
        assert (_logits_via_table(recipe, hf, toks, (wrong,)) - ref).abs().max().item() > 3 * TOL, wrong


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _has_stacked_support() -> bool:
    from recipec.runtime.hf import mappings

    return hasattr(mappings, "stacked_name")


# GPT-OSS keeps all experts of a layer in one HF tensor; its table names expert E's slice `X[{E}]`.
# `recipec convert` reads and writes those through runtime/hf (mappings.stacked_name, the reader's
# slicing and the exporter's stacking), which the generic HF bridge must provide.
needs_stacked = pytest.mark.skipif(not _has_stacked_support(), reason="runtime/hf lacks stacked expert tensors "
                                   "(mappings.stacked_name): `recipec convert` cannot read/write GPT-OSS experts")


@pytest.fixture(scope="module")
def converted(tiny, mcore_tp1) -> Path:
    """`recipec convert hf-to-mcore` of the tiny model: a TP=1 dist checkpoint."""
    from recipec.runtime.hf.convert import hf_to_mcore

    hf, recipe = tiny
    hf_to_mcore(hf, hf.parent / "ck", recipe=str(recipe))
    return hf.parent / "ck"


@needs_stacked
def test_convert_round_trip(tiny, converted: Path, tmp_path: Path) -> None:
    """`recipec convert hf-to-mcore` -> Megatron logits == transformers'; `mcore-to-hf` gives back the
    same bits (stacked experts included) and a directory transformers loads."""
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import load_hf_into_chunks, mcore_to_hf

    hf, recipe = tiny
    toks = hfutil.tokens(hf_vocab())
    ref = hfutil.hf_logits(hf, toks)
    chunks, c, padded = hfutil.megatron_model(recipe)
    ckpt.load_latest(converted, chunks, None, None, "", with_optimizer=False)
    assert (hfutil.megatron_logits(chunks[0], toks)[..., : hf_vocab()] - ref).abs().max().item() < TOL
    direct, c, padded = hfutil.megatron_model(recipe)
    load_hf_into_chunks(hf, direct, c, padded)
    assert (hfutil.megatron_logits(direct[0], toks)[..., : hf_vocab()] - ref).abs().max().item() < TOL

    back = mcore_to_hf(converted, tmp_path / "back", recipe=str(recipe))
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config = json.loads((back / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == 4
    assert (hfutil.hf_logits(back, toks) - ref).abs().max().item() == 0.0


SCRIPT = Path(__file__).resolve().parent / "scripts" / "hf_parallel.py"


@needs_stacked
def test_ep2_logits(tiny, converted: Path, tmp_path: Path) -> None:
    """EP=2 (real 2-process torchrun, gloo) from the HF directory and from the TP=1 checkpoint
    (resharded on load). TP=2 is refused for MoE on CPU: Megatron's token dispatcher needs sequence
    parallelism, which the CPU local spec lacks."""
    hf, recipe = tiny
    ck, out = converted, tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(hfutil.free_port()), str(SCRIPT), "--hf-dir", str(hf), "--recipe", str(recipe),
           "--ckpt", str(ck), "--out", str(out), "--ep", "2"]
    proc = subprocess.run(cmd, check=False, env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    result = json.loads(out.read_text())
    assert result["hf_dir"] < TOL and result["ckpt"] < TOL, result


def test_mxfp4_checkpoint_is_refused(tmp_path: Path) -> None:
    """The published checkpoints' config.json names MXFP4 experts: one message, exit 2, a hint."""
    cfg = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], **TINY,
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run = subprocess.run([sys.executable, "-c", "from recipec.compiler.cli import main; main()", "import-hf",
                          str(tmp_path)], check=False, env=hfutil.clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "quantization_config" in run.stderr and "mxfp4" in run.stderr and "dequantize" in run.stderr
    assert "Traceback" not in run.stderr


STEP = re.compile(r"step\s+(\d+)/\d+ \| loss ([\d.]+)")


@pytest.mark.parametrize("layout", [[], ["launch.gpus_per_node=2", "parallel.expert_model_parallel_size=2"]],
                         ids=["tp1", "ep2"])
def test_tiny_recipe_trains_through_recipec_launch(tmp_path: Path, layout: list[str]) -> None:
    """The bundled gpt_oss_tiny recipe through `recipec launch` (torchrun, gloo): the loss falls, on one
    process (where Megatron's in-place expert-bias add needs the family's linear_fc2) and under EP=2."""
    argv = [sys.executable, "-m", "recipec.compiler.cli", "launch", "gpt_oss_tiny", "train.train_iters=8",
            "logging.log_interval=1", "train.eval_interval=1000", "checkpoint.save_interval=1000",
            f"launch.master_port={hfutil.free_port()}", *layout, "-o", "build/tiny"]
    proc = subprocess.run(argv, cwd=tmp_path, check=False, env=hfutil.clean_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = {int(step): float(loss) for step, loss in STEP.findall(out)}
    assert sorted(losses) == list(range(1, 9)), out[-4000:]
    assert losses[8] < losses[1] - 1.0, losses
