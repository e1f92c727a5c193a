"""`recipec convert verify CKPT HF_DIR`: does a converted checkpoint compute what transformers computes?

Why: a conversion that writes every tensor can still be wrong (a transposed projection, a
mis-ordered fused QKV, a RoPE variant the family does not map); the only proof is the logits.
Users need this after every conversion (Megatron-Bridge ships a compare script for the same).

What it does, in one process (TP=1, PP=1, no torchrun; a dist checkpoint of any saved layout
loads there, since dist checkpoints reshard):

1. takes the recipe compiled the way `convert hf-to-mcore` does (compiler.api.compile_for_hf, by the
   CLI; without --recipe, the one `recipec import-hf` makes for HF_DIR) and checks that HF_DIR
   describes that model (convert.check_hf_matches);
2. builds the recipe's Megatron model, checks the checkpoint's tensor names and shapes against
   it (another model is one message, not Megatron's traceback), checks the files against the
   manifest (sizes and sha256 hashes; hf-to-mcore's checkpoints have both),
   loads the weights and runs one token batch (seeded random ids inside the vocabulary, or
   `--text` through HF_DIR's tokenizer), keeps the logits and frees the model;
3. runs the same batch through transformers' model (so only one model is in memory at a time);
4. prints one block (model, tokens, max and mean |diff|, argmax agreement, PASS/FAIL) and
   returns 0 within `--atol`, 1 above it, 2 for anything a user or a file caused.

On CPU both models compute in fp32 (the default atol 1e-4 is then tight: a correct conversion
differs by ~1e-6). On a GPU they compute in the recipe's precision.dtype; in bf16/fp16 rounding
across the layers makes differences of 0.1 ordinary, so the default atol there is a loose
HALF_ATOL (pass --fp32 on a GPU for the tight check, or --atol).
"""

from __future__ import annotations

import gc
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import click
import torch
import torch.distributed as dist
from recipec.compiler.cli_base import files as _files
from recipec.compiler.cli_base import overrides as _overrides
from recipec.compiler.cli_base import user_errors as _user_errors
from recipec.compiler.schema import RecipeConfig

from ..sharded import sharded_tensors
from .convert import (
    Compiler,
    _no_random_init,  # one copy: it keeps the yarn_* attributes a dataclasses.replace would drop
    _reading,
    check_hf_matches,
    compile_recipe,
    ensure_distributed,
    resolve_checkpoint,
)
from .reader import HFConvertError, is_hf_dir

DEFAULT_ATOL = 1e-4  # fp32 (CPU, or --fp32)
HALF_ATOL = 0.5  # bf16/fp16 on a GPU: a smoke threshold; argmax agreement says more there
DEFAULT_SEQ = 32
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.frozen
class VerifyResult:
    """One comparison of Megatron's logits (from the checkpoint) with transformers' (from HF_DIR)."""

    model: str  # e.g. "llama: 2 layers, hidden 64, vocab 256 (recipe tiny)"
    checkpoint: Path  # the step directory that was loaded
    hf_dir: Path
    tokens: str  # how the batch was made
    compute: str  # dtype, device and Megatron layer backend
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agree: int  # positions whose top token is the same
    positions: int
    atol: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol

    def report(self) -> str:
        verdict = (f"PASS (max |diff| <= atol {self.atol:.0e})" if self.passed
                   else f"FAIL (max |diff| {self.max_abs_diff:.3e} > atol {self.atol:.0e})")
        pct = 100.0 * self.argmax_agree / max(self.positions, 1)
        rows = (("model", self.model), ("checkpoint", self.checkpoint), ("hf", self.hf_dir),
                ("tokens", self.tokens), ("compute", self.compute),
                ("max |diff|", f"{self.max_abs_diff:.3e}"), ("mean |diff|", f"{self.mean_abs_diff:.3e}"),
                ("argmax agree", f"{pct:.2f}% ({self.argmax_agree}/{self.positions} positions)"),
                ("result", verdict))
        return "recipec convert verify\n" + "\n".join(f"  {k + ':':<14}{v}" for k, v in rows)


# ---------------------------------------------------------------- the comparison
def verify(checkpoint: str | Path, hf_dir: str | Path, *, recipe: str | None = None, overrides: Sequence[str] = (),
           files: Sequence[str] = (), atol: float | None = None, batch: int = 2, seq: int | None = None,
           seed: int = 0, text: str | None = None, device: str = "auto", fp32: bool = False,
           config: RecipeConfig | None = None) -> VerifyResult:
    """Compare the logits of checkpoint (a root or one iter_* directory) with HF_DIR's on one batch.

    `config`: the compiled recipe (what the CLI passes); else `recipe`/`overrides`/`files` are compiled.
    Raises a RecipeError (HFConvertError) for anything the user or a file caused."""
    step_dir, hf_dir = check_inputs(checkpoint, hf_dir, batch, seq)
    on_gpu = _on_gpu(device)
    c = config if config is not None else compile_recipe(recipe, overrides, files, hf_dir)
    check_hf_matches(hf_dir, c)
    dtype = "fp32" if fp32 or not on_gpu else c.precision.dtype
    c = _single_process(c, dtype, on_gpu)
    if atol is None:
        atol = DEFAULT_ATOL if dtype == "fp32" else HALF_ATOL
    if on_gpu and dtype == "fp32":  # TF32 matmuls would differ by ~1e-3 on their own
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    toks, described = _batch(c, hf_dir, batch, seq, seed, text)
    # The checkpoint first: what is wrong with it shows before transformers loads anything.
    got, backend = _megatron_logits(step_dir, c, toks, on_gpu)
    gc.collect()  # the Megatron model, before transformers' is built
    if on_gpu:
        torch.cuda.empty_cache()
    ref = _hf_logits(hf_dir, toks, _TORCH_DTYPES[dtype], on_gpu)
    vocab = ref.shape[-1]
    got = got[..., :vocab].double()  # the Megatron vocabulary is padded
    ref = ref.double()
    diff = (got - ref).abs()
    agree = int((got.argmax(-1) == ref.argmax(-1)).sum().item())
    m = c.model
    return VerifyResult(
        model=f"{m.architecture}: {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size} "
              f"(recipe {c.name})",
        checkpoint=step_dir, hf_dir=hf_dir, tokens=described,
        compute=f"{dtype} on {'cuda' if on_gpu else 'cpu'}, Megatron {backend}, TP=1 PP=1",
        max_abs_diff=float(diff.max().item()), mean_abs_diff=float(diff.mean().item()),
        argmax_agree=agree, positions=int(toks.numel()), atol=float(atol))


def check_inputs(checkpoint: str | Path, hf_dir: str | Path, batch: int, seq: int | None) -> tuple[Path, Path]:
    """(step directory, HF directory) once the arguments make sense; checked before the recipe compiles."""
    checkpoint, hf_dir = Path(checkpoint), Path(hf_dir)
    for what, path in (("checkpoint", checkpoint), ("HF directory", hf_dir)):
        if not path.is_dir():
            raise HFConvertError(f"{path}: no such directory (the {what} to compare)")
    if not is_hf_dir(hf_dir):
        raise HFConvertError(f"{hf_dir} is not a Hugging Face model directory (config.json + *.safetensors); "
                             "verify takes CKPT first, then HF_DIR")
    step_dir = resolve_checkpoint(checkpoint)
    if batch < 1 or (seq is not None and seq < 1):
        raise HFConvertError("--batch and --seq must be at least 1")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise HFConvertError("convert verify runs as one process (TP=1, PP=1); start it without torchrun: the "
                             "checkpoint loads at TP=1/PP=1 whatever layout it was saved in")
    return step_dir, hf_dir


def _on_gpu(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise HFConvertError("--device cuda but no CUDA device is visible here; use --device cpu")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _single_process(c: RecipeConfig, dtype: str, on_gpu: bool) -> RecipeConfig:
    """The recipe's model at TP=PP=CP=EP=1, in `dtype`, without what only training needs (CUDA
    graphs, torch.compile) and, on CPU, with local layers (Transformer Engine needs a GPU)."""
    p = attrs.evolve(c.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                     virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
                     expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False)
    prec = attrs.evolve(c.precision, dtype=dtype, fp8=None)
    train = attrs.evolve(c.train, cuda_graph="none", torch_compile=False)
    model = c.model if on_gpu else attrs.evolve(c.model, transformer_impl="local")
    return attrs.evolve(c, parallel=p, precision=prec, train=train, model=model)


def _batch(c: RecipeConfig, hf_dir: Path, batch: int, seq: int | None, seed: int,
           text: str | None) -> tuple[torch.Tensor, str]:
    """[batch, seq] token ids and how they were made."""
    limit = c.model.max_position_embeddings
    if text is None:
        n = DEFAULT_SEQ if seq is None else seq
        if n > limit:
            raise HFConvertError(f"--seq {n} is longer than model.max_position_embeddings = {limit}")
        ids = torch.randint(0, c.model.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))
        return ids, f"{batch} x {n} random ids in [0, {c.model.vocab_size}) (seed {seed})"
    ids_list = _tokenize(hf_dir, text)[: seq or limit]
    if not ids_list:
        raise HFConvertError(f"--text {text[:40]!r} gives no tokens")
    if max(ids_list) >= c.model.vocab_size:
        raise HFConvertError(f"{hf_dir}'s tokenizer gives id {max(ids_list)}, outside the model's vocabulary "
                             f"({c.model.vocab_size}); is it this model's tokenizer?")
    shown = text if len(text) <= 40 else text[:37] + "..."
    return torch.tensor([ids_list] * batch), f"{batch} x {len(ids_list)} ids of --text {shown!r}"


def _tokenize(hf_dir: Path, text: str) -> list[int]:
    """HF_DIR's own tokenizer (local files only, no remote code)."""
    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise HFConvertError(f"--text needs a tokenizer in {hf_dir} (tokenizer.json, tokenizer.model or vocab.json); "
                             "leave --text out to compare on random token ids")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise HFConvertError(f"{hf_dir}: its tokenizer does not load ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _hf_logits(hf_dir: Path, toks: torch.Tensor, dtype: torch.dtype, on_gpu: bool) -> torch.Tensor:
    """transformers' logits (on the CPU, fp32 storage), the model freed before returning."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, use_safetensors=True,
                                                           local_files_only=True, trust_remote_code=False,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc).strip()
        raise HFConvertError(f"transformers cannot load {hf_dir} ({type(exc).__name__}: "
                             f"{text.splitlines()[0][:300] if text else ''})") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                                              for k in info.get("mismatched_keys") or [])
    if missing:
        raise HFConvertError(f"{hf_dir} lacks (or misshapes) {len(missing)} tensors transformers needs, e.g. "
                             f"{missing[:3]}; it would fill them at random, so the comparison would mean nothing")
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    model.to(dev).eval()
    with torch.no_grad():
        logits = model(toks.to(dev)).logits.float().cpu()
    del model
    gc.collect()
    return logits


# ---------------------------------------------------------------- the Megatron side
def _check_fits(step_dir: Path, saved: dict[str, Any], chunk: Any, c: RecipeConfig, padded: int) -> None:
    """The checkpoint holds the recipe's model: its manifest's model record (when it has one) and every
    tensor name and global shape agree; else one message instead of Megatron's traceback."""
    from recipec.runtime import ckpt_compat, ckpt_manifest

    meta, _ = ckpt_manifest.read_manifest(step_dir)
    if meta is not None:
        structure, _math = ckpt_compat.differences(meta, ckpt_compat.model_record(c, padded))
        if structure:
            raise HFConvertError(f"{step_dir} does not hold the recipe's model: its manifest records another "
                                 f"(saved -> recipe: {ckpt_compat.describe(structure)}); pass the recipe the "
                                 "checkpoint was made with (--recipe, overrides)")
    missing, wrong = set(), []
    for sh in sharded_tensors(chunk.sharded_state_dict()):
        key, shape = sh.key, tuple(sh.global_shape)
        have = saved.get(key)
        if have is None:
            missing.add(key)
        elif tuple(have.global_shape) != shape:
            wrong.append(f"{key}: checkpoint {tuple(have.global_shape)}, model {shape}")
    if missing or wrong:
        parts = ([f"{len(missing)} tensors missing (e.g. {sorted(missing)[:3]})"] if missing else []) + \
                ([f"{len(wrong)} of another shape (e.g. {min(wrong)})"] if wrong else [])
        raise HFConvertError(f"{step_dir} does not hold the recipe's model: {'; '.join(parts)}; is it a checkpoint "
                             "of another model, or does the recipe (--recipe, overrides) differ from the one it "
                             "was made with?")


def _megatron_logits(step_dir: Path, c: RecipeConfig, toks: torch.Tensor, on_gpu: bool) -> tuple[torch.Tensor, str]:
    """Logits of the recipe's Megatron model with the checkpoint's weights ([b, s, padded vocab], CPU fp32)."""
    from megatron.core import dist_checkpointing, parallel_state
    from recipec.runtime import ckpt_manifest
    from recipec.runtime.ckpt_state import sharded_state
    from recipec.runtime.model import build_model_chunks, init_model_parallel

    created = ensure_distributed()
    try:
        if dist.get_world_size() != 1:
            raise HFConvertError("convert verify runs as one process (TP=1, PP=1); start it without torchrun")
        if not parallel_state.model_parallel_is_initialized():
            init_model_parallel(c)
        with _reading(step_dir):
            saved = dist_checkpointing.load_tensors_metadata(str(step_dir))
        emb = saved.get("embedding.word_embeddings.weight")
        if emb is None:
            raise HFConvertError(f"{step_dir} has no embedding.word_embeddings.weight; is it a GPT checkpoint?")
        padded = int(emb.global_shape[0])
        with _no_random_init():
            chunks, backend = build_model_chunks(c, padded, on_gpu=on_gpu)
        model = chunks[0]
        _check_fits(step_dir, saved, model, c, padded)
        problem = ckpt_manifest.verify(step_dir)
        if problem is not None and (step_dir / ckpt_manifest.MANIFEST).is_file():
            raise HFConvertError(f"{step_dir} is damaged: {problem}; convert or save it again, or point at another one")
        with torch.no_grad(), _reading(step_dir):
            state = sharded_state(chunks, None, None, loading=True, with_optimizer=False, with_rng=False,
                                  sharding="fully_reshardable")
            loaded = dist_checkpointing.load(state, str(step_dir))
        model.load_state_dict(loaded["model"], strict=True)
        model.eval()
        dev = next(model.parameters()).device
        x = toks.to(dev)
        pos = torch.arange(x.shape[1], device=dev).unsqueeze(0).expand_as(x)
        with torch.no_grad():
            logits = model(x, pos, None).float().cpu()
        return logits, backend
    finally:
        if created:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


# ---------------------------------------------------------------- command line
@click.command("verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", metavar="CKPT")
@click.argument("hf_dir")
@_overrides
@click.option("--recipe", metavar="R.toml|NAME", help="Recipe describing the model (default: what import-hf makes).")
@_files
@click.option("--atol", type=float, default=None,
              help=f"Largest max |diff| that passes [default: {DEFAULT_ATOL:g} in fp32, {HALF_ATOL:g} in bf16/fp16].")
@click.option("--seq", type=click.IntRange(min=1), default=None, help=f"Tokens per sequence [default: {DEFAULT_SEQ}].")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="Sequences.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random token ids.")
@click.option("--text", default=None, help="Compare on this text (HF_DIR's tokenizer) instead of random ids.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when visible.")
@click.option("--fp32", is_flag=True, help="On a GPU, compute in fp32 instead of the recipe's precision.dtype.")
@_user_errors
def verify_cmd(checkpoint: str, hf_dir: str, overrides: tuple[str, ...], recipe: str | None, files: tuple[str, ...],
               atol: float | None, seq: int | None, batch: int, seed: int, text: str | None, device: str,
               fp32: bool) -> None:
    """Compare CKPT's logits (Megatron) with HF_DIR's (transformers) on one token batch.

    Exit 0 when max |diff| <= --atol, 1 above it, 2 on a user error. One process, TP=1 and PP=1
    (a checkpoint saved under any layout loads there); not under torchrun. Both models are in
    memory one after the other: the larger needs its size in RAM (fp32 on CPU: 4 bytes/param)."""
    check_inputs(checkpoint, hf_dir, batch, seq)  # a wrong path says so before the recipe compiles
    compiler: Compiler = click.get_current_context().find_root().obj or compile_recipe  # main()'s, the CLI's
    config = compiler(recipe, overrides, files, Path(hf_dir))
    result = verify(checkpoint, hf_dir, atol=atol, batch=batch, seq=seq, seed=seed, text=text, device=device,
                    fp32=fp32, config=config)
    click.echo(result.report())
    sys.exit(0 if result.passed else 1)


def main(argv: list[str], prog_name: str = "recipec convert verify", compiler: Compiler | None = None) -> int:
    """Entry point: `python -m recipec.runtime.hf.verify ...`; `compiler` compiles the recipe (the CLI's,
    compiler/cli.py; else compile_recipe)."""
    from recipec.runtime.logs import console
    from recipec.runtime.safe_load import install

    console()
    install()  # weights-only torch.load and data-only DCP metadata, before any checkpoint is read
    try:
        verify_cmd.main(args=argv, prog_name=prog_name, standalone_mode=True, obj=compiler)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
