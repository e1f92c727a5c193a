"""LoRA / DoRA checkpoints exported to Hugging Face (runtime/hf/lora_export.py), fp32 on CPU.

A tiny random HF model is loaded into the recipe's Megatron model, adapters are added and given
random B (and DoRA magnitudes), and the model state is saved as a dist checkpoint. Then:

- merged (`recipec convert mcore-to-hf --merge-lora`): transformers' logits of the export equal the
  Megatron adapter model's (1e-5);
- adapter only (`--adapter-only`): PEFT's files (keys, shapes, adapter_config.json); the adapters
  applied by hand to the base HF model, and through `peft.PeftModel` when peft is importable,
  give the merged export's logits (1e-5);
- a checkpoint with adapters is not exported without one of the two flags.

Cases: Llama with LoRA (GQA: the fused qkv's interleave is split per group) and Qwen2 with DoRA
(a qkv bias, which DoRA leaves unscaled; tied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil

RANK, ALPHA = 4, 8.0
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


class Case:
    def __init__(self, root: Path, arch: str, method: str, mine: torch.Tensor, c) -> None:
        self.root, self.arch, self.method, self.mine, self.c = root, arch, method, mine, c
        self.hf, self.recipe, self.ckpt = root / "hf", root / "ft.toml", root / "ckpt"
        self.overrides = [f"checkpoint.pretrained={self.hf}"]
        self.vocab = hfutil.ARCHS_VOCAB(self.hf)
        self.toks = hfutil.tokens(self.vocab)


@pytest.fixture(scope="module", params=[("llama2", "lora"), ("qwen2", "dora")], ids=lambda p: "-".join(p))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mcore_tp1) -> Case:
    """A trained-looking adapter checkpoint of a tiny HF model, and the Megatron model's logits."""
    from megatron.core import dist_checkpointing
    from recipec.runtime.hf.convert import load_hf_into_chunks
    from recipec.runtime.lora import apply_lora, init_adapters

    arch, method = request.param
    root = tmp_path_factory.mktemp(f"{arch}_{method}")
    hf = hfutil.make_hf_model(arch, root / "hf")
    hfutil.write_recipe(hf, root / "ft.toml",
                        f'\n[peft]\nmethod = "{method}"\nlora_rank = {RANK}\nlora_alpha = {ALPHA}\n')
    chunks, c, padded = hfutil.megatron_model(root / "ft.toml", (f"checkpoint.pretrained={hf}",))
    load_hf_into_chunks(hf, chunks, c, padded)
    apply_lora(chunks, c)
    init_adapters(chunks, c.train.seed)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            elif name.endswith("adapter.weight_magnitude"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
    made = Case(root, arch, method, torch.empty(0), c)
    made.mine = hfutil.megatron_logits(chunks[0], made.toks)[..., : made.vocab]
    made.ckpt.mkdir()
    dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, str(made.ckpt))
    return made


def _convert(case: Case, *args: str) -> tuple[int, str]:
    """`recipec convert mcore-to-hf CKPT --recipe R ARGS` through its click command, in this process
    (the model-parallel state is this module's)."""
    from click.testing import CliRunner
    from recipec.runtime.hf.cli import convert

    result = CliRunner().invoke(convert, ["mcore-to-hf", str(case.ckpt), "--recipe", str(case.recipe),
                                          *case.overrides, *args])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


@pytest.fixture(scope="module")
def merged(case: Case) -> Path:
    out = case.root / "merged"
    if case.method == "lora":  # the command a user runs
        code, output = _convert(case, "--merge-lora", "-o", str(out))
        assert code == 0, output[-3000:]
    else:
        from recipec.runtime.hf.convert import mcore_to_hf

        mcore_to_hf(case.ckpt, out, recipe=str(case.recipe), overrides=case.overrides, merge_lora=True)
    return out


@pytest.fixture(scope="module")
def adapter(case: Case) -> Path:
    out = case.root / "adapter"
    if case.method == "lora":
        code, output = _convert(case, "--adapter-only", "-o", str(out))
        assert code == 0, output[-3000:]
    else:
        from recipec.runtime.hf.lora_export import export_adapter

        export_adapter(case.ckpt, out, recipe=str(case.recipe), overrides=case.overrides)
    return out


def test_merged_export_gives_the_adapter_models_logits(case: Case, merged: Path) -> None:
    theirs = hfutil.hf_logits(merged, case.toks)
    assert (case.mine - theirs).abs().max().item() < 1e-5
    # The adapters changed the model: the base HF model's logits are far from these.
    assert (hfutil.hf_logits(case.hf, case.toks) - theirs).abs().max().item() > 1e-3
    assert not any(".adapter." in k or "lora" in k for k in json.dumps(sorted(_keys(merged))))


def _keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return keys


def test_adapter_only_export_is_peft_format(case: Case, adapter: Path) -> None:
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert config["use_dora"] is (case.method == "dora")
    assert sorted(config["target_modules"]) == sorted(m.split(".")[1] for m in MODULES)
    assert config["base_model_name_or_path"] == str(case.hf)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    parts = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if case.method == "dora" else ())
    layers = case.c.model.num_layers
    want = {f"base_model.model.model.layers.{n}.{m}.{p}" for n in range(layers) for m in MODULES for p in parts}
    assert set(tensors) == want
    m, h, d = case.c.model, case.c.model.hidden_size, case.c.model.kv_channels
    prefix = "base_model.model.model.layers.1."
    assert tensors[prefix + "self_attn.q_proj.lora_B.weight"].shape == (m.num_attention_heads * d, RANK)
    assert tensors[prefix + "self_attn.k_proj.lora_B.weight"].shape == (m.num_query_groups * d, RANK)
    assert tensors[prefix + "mlp.down_proj.lora_A.weight"].shape == (RANK, m.ffn_hidden_size)
    assert tensors[prefix + "mlp.gate_proj.lora_A.weight"].shape == (RANK, h)
    # A multiplies the input the split modules share: one copy each.
    assert torch.equal(tensors[prefix + "self_attn.q_proj.lora_A.weight"], tensors[prefix + "self_attn.v_proj.lora_A.weight"])


def _apply_by_hand(case: Case, adapter: Path):
    """The base HF model with the PEFT adapter's update written into its weights, here in the test."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(case.hf, torch_dtype=torch.float32)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
            name = key[len("base_model.model."): -len(".lora_A.weight")]
            w = modules[name].weight
            v = w + scale * tensors[f"base_model.model.{name}.lora_B.weight"] @ tensors[key]
            magnitude = tensors.get(f"base_model.model.{name}.lora_magnitude_vector")
            if magnitude is not None:  # DoRA: m per output row over the row's norm
                v = magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
            w.copy_(v)
    return model.eval()


def test_adapter_applied_to_the_base_model_gives_the_merged_logits(case: Case, adapter: Path, merged: Path) -> None:
    want = hfutil.hf_logits(merged, case.toks)
    with torch.no_grad():
        by_hand = _apply_by_hand(case, adapter)(case.toks).logits
    assert (by_hand - want).abs().max().item() < 1e-5
    try:
        from peft import PeftModel
    except ImportError:
        return  # peft is not a dependency; the by-hand application above checks the same numbers
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(case.hf, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(case.toks).logits
    assert (theirs - want).abs().max().item() < 1e-5


def test_adapter_checkpoint_needs_a_flag_and_its_recipe(case: Case, tmp_path: Path) -> None:
    from recipec.runtime.hf.convert import mcore_to_hf
    from recipec.runtime.hf.reader import HFConvertError

    with pytest.raises(HFConvertError, match="--merge-lora .* or --adapter-only"):
        mcore_to_hf(case.ckpt, tmp_path / "plain", recipe=str(case.recipe), overrides=case.overrides)
    with pytest.raises(HFConvertError, match="peft.method is unset"):
        mcore_to_hf(case.ckpt, tmp_path / "plain", recipe=str(case.recipe), overrides=[*case.overrides, "~peft.method"],
                    merge_lora=True)
    code, output = _convert(case, "--merge-lora", "--adapter-only", "-o", str(tmp_path / "both"))
    assert code == 2 and "exclude each other" in output, output
    other = "lora" if case.method == "dora" else "dora"
    with pytest.raises(HFConvertError, match=f"peft.method is '{other}'"):
        mcore_to_hf(case.ckpt, tmp_path / "plain", recipe=str(case.recipe),
                    overrides=[*case.overrides, f"peft.method={other}"], merge_lora=True)
