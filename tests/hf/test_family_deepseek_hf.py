"""DeepSeek-V3 / V2 end to end on CPU, with tiny random transformers models (made from transformers' own
config classes, never downloaded): import-hf -> hf-to-mcore -> Megatron logits equal transformers' at TP=1
(from the checkpoint and straight from the HF directory) and under EP=2 / TP=2 (torchrun), the
mcore-to-hf round trip is bit exact; the compiler's FLOPs formula counts the MLA model's matmuls; the
tiny bundled recipe trains through `recipec launch` with EP=2 (MoE, MTP on).

What the tiny models exercise: MLA with a q LoRA (V3) and without (V2-Lite style), q/k heads wider
than v heads (24 vs 16), YaRN with mscale, a dense first layer then MoE layers, shared experts,
V3's sigmoid routing with a (random) expert bias, 2 of 4 expert groups and routed scaling 2.5,
V2's softmax routing without renormalization, random norm weights.
"""

from __future__ import annotations

import json
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
SCRIPT = Path(__file__).resolve().parent / "scripts" / "hf_parallel.py"
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
_V3 = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 96,
       "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 8,
       "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
       "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
       "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_parameters": _YARN}
TINY: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(model_type="deepseek_v3", **_V3),
    "deepseek_v2": dict(model_type="deepseek_v2", **{
        **_V3, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 3, "n_shared_experts": 2,
        "routed_scaling_factor": 1.0, "rope_parameters": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}},
        topk_method="greedy", norm_topk_prob=False),
    # Every layer dense (first_k_dense_replace = layers): MLA alone, which TP shards by heads.
    "deepseek_v3_dense": dict(model_type="deepseek_v3", **{**_V3, "num_hidden_layers": 2, "first_k_dense_replace": 2}),
}


def make_hf_model(arch: str, directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[arch])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms are ones and the expert bias zero at init: make them random so a mix-up shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """HF dir, import-hf recipe (+ the tiny-CPU overlay) and TP=1 dist checkpoint per tiny model."""
    from recipec.runtime.hf.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for arch in TINY:
        hf = make_hf_model(arch, root / arch)
        recipe = hfutil.write_recipe(hf, root / f"{arch}.toml")
        hf_to_mcore(hf, root / f"{arch}_ck", recipe=str(recipe))
        out[arch] = (hf, recipe, root / f"{arch}_ck")
    return out


def _tensors(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_logits_match_transformers_and_the_round_trip_is_bit_exact(converted, tmp_path: Path, arch: str,
                                                                   mcore_tp1: None) -> None:
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import load_hf_into_chunks, mcore_to_hf

    hf, recipe, ck = converted[arch]
    toks = hfutil.tokens(256)
    ref = hfutil.hf_logits(hf, toks)
    assert ref.std() > 0.01
    chunks, _, _ = hfutil.megatron_model(recipe)
    ckpt.load_latest(ck, chunks, None, None, "", with_optimizer=False)
    assert (hfutil.megatron_logits(chunks[0], toks)[..., :256] - ref).abs().max().item() < TOL
    direct, c, padded = hfutil.megatron_model(recipe)
    load_hf_into_chunks(hf, direct, c, padded)
    assert (hfutil.megatron_logits(direct[0], toks)[..., :256] - ref).abs().max().item() < TOL

    back = mcore_to_hf(ck, tmp_path / "back", recipe=str(recipe))
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (hfutil.hf_logits(back, toks) - ref).abs().max().item() == 0.0
    exported = json.loads((back / "config.json").read_text())
    assert exported["model_type"] == TINY[arch]["model_type"] and exported["first_k_dense_replace"] == 1


@pytest.mark.parametrize("arch, flags", [("deepseek_v3", ["--ep", "2"]), ("deepseek_v3_dense", ["--tp", "2"])],
                         ids=["v3-ep2", "v3_dense-tp2"])
def test_layouts_match_transformers(converted, tmp_path: Path, arch: str, flags: list[str]) -> None:
    """torchrun, 2 ranks: experts split over EP, and MLA's heads over TP (MoE under TP needs sequence
    parallelism, which the CPU local spec lacks, hence the dense model)."""
    hf, recipe, ck = converted[arch]
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(hfutil.free_port()), str(SCRIPT), "--hf-dir", str(hf), "--recipe", str(recipe),
           "--ckpt", str(ck), "--out", str(out), *flags]
    proc = subprocess.run(cmd, check=False, env=hfutil.clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    result = json.loads(out.read_text())
    assert result["hf_dir"] < TOL and result["ckpt"] < TOL, result


def test_flops_formula_counts_the_mla_moe_matmuls(mcore_tp1: None) -> None:
    """The compiler's FLOPs (Megatron's formula: MLA projections and scores, dense first layer, top-k +
    shared experts, MTP, logits) against torch's FLOP counter on the real model; the router's matmul
    is the one term Megatron's formula leaves out."""
    from recipec.compiler import build
    from recipec.runtime.device import activate_cpu_mode
    from recipec.runtime.model import build_model_chunks
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    activate_cpu_mode()
    compiled = build("deepseek_v3_tiny", ["train.global_batch_size=2", "train.micro_batch_size=2",
                                          "model.mtp_num_layers=1", "model.seq_length=64"])
    c, plan = compiled.config, compiled.plan
    (model,) = build_model_chunks(c, plan.padded_vocab_size, on_gpu=False)[0]
    m = c.model
    b, s = c.train.micro_batch_size, m.seq_length
    tokens = torch.randint(0, m.vocab_size, (b, s))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss = model(tokens, torch.arange(s).expand(b, s), None, labels=tokens).float().mean()
        loss.backward()
    layers = m.num_layers + m.mtp_num_layers
    router = 6 * b * s * m.hidden_size * m.num_moe_experts * (layers - m.moe_first_k_dense)
    # The local path's LatentSDPAttention zero-pads v (32) to the q/k head dim (48) for SDPA.
    padding = 6 * b * s * s * m.num_attention_heads * (m.qk_head_dim + m.qk_pos_emb_head_dim - m.v_head_dim) * layers
    assert plan.flops_per_step + router + padding == counter.get_total_flops()


_LOSS = re.compile(r"step\s+(\d+)/\d+ \| loss ([0-9.]+)")


def test_tiny_recipe_trains_through_recipec_launch(tmp_path: Path) -> None:
    """Two ranks: the experts split over EP=2 (data parallel 2), the MTP option on. (TP=2 is the layout
    test above: MLA's logits under TP equal transformers'.)"""
    cmd = [sys.executable, "-m", "recipec.compiler.cli", "launch", "deepseek_v3_tiny", "launch.gpus_per_node=2",
           "train.train_iters=8", "logging.log_interval=1", "train.eval_interval=1000", "checkpoint.save_interval=1000",
           f"launch.master_port={hfutil.free_port()}", "parallel.expert_model_parallel_size=2",
           "model.mtp_num_layers=1", "-o", "build/tiny"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=hfutil.clean_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = {int(step): float(loss) for step, loss in _LOSS.findall(out)}
    assert sorted(losses) == list(range(1, 9)), out[-4000:]
    assert losses[8] < losses[1] - 1.0, losses
