"""A finetune that starts from an HF directory through the real runtime (`recipec build`, then
`python -m torch.distributed.run --nproc-per-node 1 -m recipec.runtime.train --artifact DIR`),
exported back with `recipec convert mcore-to-hf`: transformers' logits equal the trained Megatron model's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil  # noqa: E402

RECIPEC = [sys.executable, "-c", "from recipec.compiler.cli import main; main()"]


def test_finetune_from_hf_dir_and_export(tmp_path: Path) -> None:
    # Byte-level text data needs vocab >= 257; a tied Llama 3.2-style model.
    hf = hfutil.make_hf_model("llama32", tmp_path / "hf", vocab_size=257)
    save = tmp_path / "ckpts"
    extra = (f'\n[data]\nkind = "text"\npaths = ["builtin:tiny_corpus"]\nsplit = "95,5,0"\nnum_workers = 0\n'
             f'\n[tokenizer]\ntype = "byte"\n'
             f'\n[checkpoint]\npretrained = "{hf}"\nsave = "{save}"\n'
             f'\n[launch]\noutput_dir = "{tmp_path}/runs/{{name}}"\n\n[logging]\nlog_interval = 1\n')
    base = hfutil.write_recipe(hf, tmp_path / "ft_base.toml")
    recipe = tmp_path / "ft.toml"
    recipe.write_text(f'extends = "{base.name}"\nname = "ft"\n' + extra)
    env = hfutil.clean_env()
    run = subprocess.run(RECIPEC + ["build", str(recipe), "-o", str(tmp_path / "build")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                          "--master-port", str(hfutil.free_port()), "-m", "recipec.runtime.train",
                          "--artifact", str(tmp_path / "build")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert f"loaded Hugging Face weights from {hf}" in out
    assert len(re.findall(r"step\s+\d+/3 \| loss", out)) == 3, out[-3000:]
    assert (save / "latest").read_text().strip() == "3"

    back = tmp_path / "hf_out"
    run = subprocess.run(RECIPEC + ["convert", "mcore-to-hf", str(save), "--recipe", str(recipe), "-o", str(back)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    # The runtime's model: the saved checkpoint loaded into a fresh Megatron model (in this process).
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime.hf.convert import ensure_distributed

    created = ensure_distributed()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    try:
        chunks, c, _ = hfutil.megatron_model(recipe)
        assert ckpt.load_latest(save, chunks, None, None, "", with_optimizer=False) == 3
        toks = hfutil.tokens(257)
        mine = hfutil.megatron_logits(chunks[0], toks)[..., :257]
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
    theirs = hfutil.hf_logits(back, toks)
    assert (mine - theirs).abs().max().item() < 1e-5
    # Training moved the weights away from the pretrained ones.
    assert (hfutil.hf_logits(hf, toks) - theirs).abs().max().item() > 1e-4
