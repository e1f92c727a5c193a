"""Gemma 3 (text) through the HF bridge: a tiny random Gemma3ForCausalLM (built from transformers' own
Gemma3TextConfig, never downloaded) -> `import-hf` recipe -> `convert hf-to-mcore` -> Megatron logits equal
transformers' at TP=1 (in process) and TP=2 (torchrun), and `convert mcore-to-hf` gives back the same bits.

The tiny model has every Gemma 3 feature at a size where each one changes the logits: sliding windows of
4 on a 16-token input, alternating with global layers (pattern 2), a local RoPE theta (100) apart from the
global one (10000, linear scaling x2), query_pre_attn_scalar 24 != head_dim 32, qk-norm, sandwich norms and
zero-centred norm weights drawn at random, sqrt(hidden)-scaled tied embeddings, GeGLU (tanh)."""

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
SCRIPT = Path(__file__).resolve().parent / "scripts" / "hf_parallel.py"
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
        "query_pre_attn_scalar": 24, "rope_theta": 10000.0, "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}


def make_gemma3(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny Gemma3ForCausalLM (fp32 safetensors + config.json) into directory."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # norms are zero (1 + w = 1) at init: make them random so a mix-up shows
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, mcore_tp1) -> tuple[Path, Path, Path]:
    """HF dir, imported recipe and its TP=1 dist checkpoint (what `recipec convert hf-to-mcore` runs)."""
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("gemma3")
    hf = make_gemma3(root / "hf")
    recipe = hfutil.write_recipe(hf, root / "gemma3.toml")
    step_dir = hf_to_mcore(hf, root / "ck", recipe=str(recipe))
    assert ckpt.verify(step_dir) is None
    return hf, recipe, root / "ck"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_import_maps_every_gemma3_feature(converted) -> None:
    from recipec.compiler.api import build

    _, recipe, _ = converted
    m = build(recipe).config.model
    assert (m.architecture, m.window_size, m.window_attn_skip_freq) == ("gemma3", 3, 2)
    assert (m.rotary_base, m.rotary_base_local, m.rope_scaling, m.rope_scaling_factor) == (10000.0, 100.0,
                                                                                          "linear", 2.0)
    assert m.softmax_scale == 24 ** -0.5 and m.kv_channels == 32 and m.activation == "gelu_tanh"
    assert m.qk_layernorm and m.sandwich_norm and m.layernorm_zero_centered_gamma and m.scale_embeddings
    assert m.share_embeddings_and_output_weights


def test_logits_and_bit_exact_round_trip(converted, tmp_path: Path) -> None:
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import load_hf_into_chunks, mcore_to_hf

    hf, recipe, ck = converted
    toks = hfutil.tokens(TINY["vocab_size"])
    ref = hfutil.hf_logits(hf, toks)
    assert ref.std() > 0.01
    vocab = ref.shape[-1]

    chunks, c, padded = hfutil.megatron_model(recipe)
    ckpt.load_latest(ck, chunks, None, None, "", with_optimizer=False)
    got = hfutil.megatron_logits(chunks[0], toks)
    assert (got[..., :vocab] - ref).abs().max().item() < TOL

    direct, c, padded = hfutil.megatron_model(recipe)
    load_hf_into_chunks(hf, direct, c, padded)
    got = hfutil.megatron_logits(direct[0], toks)
    assert (got[..., :vocab] - ref).abs().max().item() < TOL
    # Each Gemma piece matters at this size: one wrong (here the local RoPE theta) moves the logits.
    off, c, padded = hfutil.megatron_model(recipe, ("model.rotary_base_local=10000.0",))
    load_hf_into_chunks(hf, off, c, padded)
    assert (hfutil.megatron_logits(off[0], toks)[..., :vocab] - ref).abs().max().item() > 1e-3

    back = mcore_to_hf(ck, tmp_path / "back", recipe=str(recipe))
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["query_pre_attn_scalar"] == 24 and cfg["sliding_window"] == 4
    assert (hfutil.hf_logits(back, toks) - ref).abs().max().item() == 0.0


def test_tp2_logits_match_transformers(converted, tmp_path: Path) -> None:
    hf, recipe, ck = converted
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(hfutil.free_port()), str(SCRIPT), "--hf-dir", str(hf), "--recipe", str(recipe),
           "--ckpt", str(ck), "--out", str(out), "--tp", "2"]
    proc = subprocess.run(cmd, check=False, env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    result = json.loads(out.read_text())
    assert result["hf_dir"] < TOL and result["ckpt"] < TOL, result


STEP_LOSS = re.compile(r"step\s+(\d+)/\d+ \| loss ([\d.]+)")


def _launch(cwd: Path, tp: int) -> dict[int, float]:
    """`recipec launch gemma3_tiny` on `tp` CPU processes (TP = tp); step -> loss from its log."""
    cwd.mkdir()
    args = ["launch", "gemma3_tiny", f"launch.gpus_per_node={tp}", f"parallel.tensor_model_parallel_size={tp}",
            "train.train_iters=12", "logging.log_interval=1", "train.eval_interval=1000",
            "checkpoint.save_interval=1000", f"launch.master_port={hfutil.free_port()}", "-o", "build/tiny"]
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", *args], cwd=cwd, env=hfutil.clean_env(),
                          check=False, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "layer spec: local" in out or "layer spec: transformer_engine" in out
    return {int(s): float(loss) for s, loss in STEP_LOSS.findall(out)}


def test_tiny_recipe_trains_through_recipec_launch_at_tp1_and_tp2(tmp_path: Path) -> None:
    tp1, tp2 = _launch(tmp_path / "tp1", 1), _launch(tmp_path / "tp2", 2)
    for losses in (tp1, tp2):
        assert sorted(losses) == list(range(1, 13))
        assert losses[1] > 5.0 and max(losses[s] for s in range(10, 13)) < losses[1] - 1.5, losses
    # Same model, same data: TP=2 computes the first steps as TP=1 does.
    assert max(abs(tp1[s] - tp2[s]) for s in range(1, 4)) < 1e-3, (tp1, tp2)


def test_lora_adapter_acts_before_the_sandwich_norm(converted) -> None:
    """LoRA on linear_proj/linear_fc2 adds its delta to the projection, under the post-norm, as a PEFT
    adapter on HF's o_proj/down_proj does (the norm is a forward hook, outside LoRA's forward)."""
    from recipec.runtime.hf.convert import load_hf_into_chunks
    from recipec.runtime.lora import apply_lora

    hf, recipe, _ = converted
    chunks, c, padded = hfutil.megatron_model(recipe, ('peft.method="lora"', "peft.lora_rank=4"))
    load_hf_into_chunks(hf, chunks, c, padded)
    apply_lora(chunks, c)
    layer = chunks[0].decoder.layers[0]
    for linear in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
        with torch.no_grad():
            linear.adapter.linear_out.weight.normal_()
            x = torch.randn(5, 2, linear.weight.shape[1])
            out, _ = linear(x)
            pre = torch.nn.functional.linear(x, linear.weight) + linear.adapter_delta(x)
        assert torch.equal(out, linear.post_layernorm(pre))
