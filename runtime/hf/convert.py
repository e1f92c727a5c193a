"""Weights between Hugging Face safetensors directories and recipec/Megatron dist checkpoints.

- `load_hf_into_chunks`: fill this rank's Megatron model chunks (any TP/PP/EP layout,
  local or TE spec) straight from an HF directory, tensor by tensor (safetensors
  `safe_open`); what the runtime does for `checkpoint.pretrained = HF_DIR`.
- `hf_to_mcore`: that, then a recipec dist checkpoint (`iter_0000000/` + hashed manifest +
  `latest`) written by `runtime/checkpoint.save` like a trained one, reshardable to other TP/PP layouts.
  Run it under torchrun with a parallel layout to split a model that does not fit
  one process's memory.
- `mcore_to_hf`: reads a dist checkpoint without building a model, one layer at a
  time (only the shards of that layer are read), and writes sharded safetensors +
  model.safetensors.index.json, then what transformers' loaders need besides the
  weights (config.json, generation_config.json, tokenizer files: export_files.py).

The checkpoint holds the recipe's `precision.dtype`, and the export the checkpoint's dtype:
`recipec import-hf` writes the HF weights' dtype there, so HF -> mcore -> HF gives back
the same bits; a recipe that trains in a narrower dtype than the weights is warned about.

The architecture-specific part is only the family's weight table (runtime/families).

Converting a large model takes minutes: rank 0 logs how far it has got every few seconds
while it runs (runtime/logs.Progress) and, at the end, what it wrote and how long it took.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from recipec.compiler.hf_fields import HFImportError
from recipec.compiler.hf_import import (
    model_fields,
    precision_dtype,
    read_hf_config,
)
from recipec.compiler.schema import RecipeConfig

from ..logs import Progress, console, size
from ..sharded import sharded_tensors
from .export_files import plan_export, write_export_files
from .lora_export import adapters_for_merge
from .mappings import ArchMapping, MappingError, Shape, stacked_name
from .reader import HFConvertError, HFReader, is_hf_dir

log = logging.getLogger("recipec.runtime")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Recipe fields an HF directory must agree with to be loaded into the recipe's model.
_MUST_MATCH = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "share_embeddings_and_output_weights",
               "qk_layernorm", "add_qkv_bias", "num_moe_experts", "moe_ffn_hidden_size",
               "moe_shared_expert_intermediate_size", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
               "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "moe_first_k_dense", "softmax_type",
               "sandwich_norm")


def model_shape(c: RecipeConfig, padded_vocab: int) -> Shape:
    m = c.model
    assert m.num_query_groups is not None and m.kv_channels is not None
    return Shape(heads=m.num_attention_heads, groups=m.num_query_groups, head_dim=m.kv_channels,
                 vocab=m.vocab_size, padded_vocab=padded_vocab, tied=m.share_embeddings_and_output_weights)


def check_hf_matches(hf_dir: Path, c: RecipeConfig) -> None:
    """The HF config describes the recipe's model (shape, family, tying); else a RecipeError naming both."""
    cfg, _ = read_hf_config(hf_dir)
    fields, _row = model_fields(cfg)
    m = c.model
    # A key the import does not set stands for the schema's default (a Llama config says nothing of MLA).
    defaults = {f.name: f.default for f in attrs.fields(type(m))}
    bad = [f"model.{k} = {getattr(m, k)!r} but {hf_dir}/config.json gives {fields.get(k, defaults[k])!r}"
           for k in _MUST_MATCH if fields.get(k, defaults[k]) != getattr(m, k)]
    if bad:
        raise HFConvertError("the Hugging Face model does not match the recipe:\n   " + "\n   ".join(bad))


# ---------------------------------------------------------------- filling a model
def _local_index(sh: Any) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset[sh.prepend_axis_num:], sh.data.shape))


def load_hf_into_chunks(hf_dir: str | Path, chunks: Sequence[Any], c: RecipeConfig, padded_vocab: int) -> int:
    """Copy the HF weights into this rank's model chunks; returns how many tensors were filled."""
    hf_dir = Path(hf_dir)
    check_hf_matches(hf_dir, c)
    reader = HFReader(hf_dir)
    mapping = ArchMapping(c.model.architecture, model_shape(c, padded_vocab))
    cache: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None
    filled = 0
    shards = [sh for chunk in chunks for sh in sharded_tensors(getattr(chunk, "module", chunk).sharded_state_dict())]
    progress = Progress(f"reading Hugging Face weights from {hf_dir}", total=len(shards), unit="tensors")
    with torch.no_grad():
        for sh in shards:
            if sh.flattened_range is not None:
                raise HFConvertError(f"{sh.key}: flattened shards are not supported here")
            prefix = tuple(sh.global_offset[: sh.prepend_axis_num])
            ident = (sh.key, prefix)
            if cache is None or cache[0] != ident:  # fused fc1 arrives as two views of one tensor
                name = mapping.canonical_name(sh.key, prefix)
                try:
                    full = mapping.to_mcore(name, reader.get)
                except MappingError as exc:
                    raise HFConvertError(f"{hf_dir}: {exc}") from None
                want = tuple(sh.global_shape[sh.prepend_axis_num:])
                if tuple(full.shape) != want:
                    raise HFConvertError(f"{name}: the HF weights give shape {tuple(full.shape)}, the model "
                                         f"expects {want}")
                cache = (ident, full)
            sh.data.copy_(cache[1][_local_index(sh)].to(sh.data.dtype))
            filled += 1
            progress.update(filled)
    return filled


# ---------------------------------------------------------------- process setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Megatron MoE modules that call torch.cuda directly (router.gating moves its weight to
# torch.cuda.current_device(); the alltoall dispatcher makes a torch.cuda.Stream) and that
# runtime/device.py's CPU mode does not list (yet): same treatment, applied here.
def cpu_mode() -> None:
    """runtime.device's CPU mode (a no-op with CUDA)."""
    from recipec.runtime import device

    device.activate_cpu_mode()


def ensure_distributed() -> bool:
    """A gloo/nccl group: torchrun's when launched by it, else a private single-rank one. True if created."""
    cpu_mode()
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return True


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Build models without drawing random weights (they are overwritten; saves time and RAM)."""
    from recipec.runtime import model as rmodel

    original = rmodel.transformer_config

    def no_init(*args: Any, **kwargs: Any) -> Any:
        # set, not dataclasses.replace: a copy would lose the attributes set on the config after
        # construction (the yarn_* ones GPTModel reads for YaRN RoPE)
        config = original(*args, **kwargs)
        config.perform_initialization = False
        return config

    rmodel.transformer_config = no_init
    try:
        yield
    finally:
        rmodel.transformer_config = original


# What compiles a conversion's recipe: (recipe, overrides, files, hf_dir) -> frozen config. The CLI
# hands its own (compiler/cli.py: compile_for_hf, warnings printed); Python callers get compile_recipe.
Compiler = Callable[[str | None, Sequence[str], Sequence[str], Path | None], RecipeConfig]


def compile_recipe(recipe: str | None, overrides: Sequence[str], files: Sequence[str], hf_dir: Path | None) -> RecipeConfig:
    """The frozen config of `recipe` (+overrides); without a recipe, the one `import-hf` makes for hf_dir.

    For Python callers that pass recipe=... instead of a compiled config=: the compiling is the
    compiler's (compiler.api.compile_for_hf); `recipec convert` compiles on the CLI side instead."""
    from recipec.compiler.api import compile_for_hf

    return compile_for_hf(recipe, tuple(overrides), overlays=tuple(files), hf_dir=hf_dir).config


def require_hf_dir(hf_dir: str | Path) -> Path:
    """hf_dir as a Path, or an HFConvertError when it is not a Hugging Face model directory."""
    if not is_hf_dir(hf_dir):
        raise HFConvertError(f"{hf_dir} is not a Hugging Face model directory (config.json + *.safetensors)")
    return Path(hf_dir)


def _warn_if_rounding(hf_dir: Path, c: RecipeConfig) -> None:
    """Say so when the checkpoint will hold the HF weights in fewer bits than the files have."""
    cfg, _ = read_hf_config(hf_dir)
    try:
        weights, _why = precision_dtype(cfg)
    except HFImportError:
        return  # an odd dtype field says nothing about the weights; the tensors are read as they are
    want = c.precision.dtype
    if want not in (weights, "fp32"):  # fp32 holds bf16 and fp16 exactly; any other change rounds
        log.warning("%s holds %s weights and the recipe's precision.dtype is %s: the checkpoint rounds them "
                    "(set precision.dtype = \"%s\", as `recipec import-hf` does, to convert them exactly)",
                    hf_dir, weights, want, weights)


def _init_model_parallel(c: RecipeConfig) -> RecipeConfig:
    """Model-parallel groups for this conversion: the recipe's layout under torchrun, TP=PP=1 alone."""
    import attrs
    from megatron.core import parallel_state, tensor_parallel
    from recipec.runtime.model import init_model_parallel

    world = dist.get_world_size()
    p = c.parallel
    if world == 1:
        p = attrs.evolve(p, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                         virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
                         expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False)
        c = attrs.evolve(c, parallel=p)
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(c)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(c.train.seed)
    return c


# ---------------------------------------------------------------- HF -> mcore
def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, recipe: str | None = None, overrides: Sequence[str] = (),
                files: Sequence[str] = (), config: RecipeConfig | None = None) -> Path:
    """Write a recipec dist checkpoint of the HF model at hf_dir under `out`; returns the step directory.

    `config`: the compiled recipe (what the CLI passes); else `recipe`/`overrides`/`files` are
    compiled (compile_recipe; without a recipe, import-hf's for hf_dir)."""
    from megatron.core import parallel_state
    from recipec.runtime import checkpoint as ckpt
    from recipec.runtime import ckpt_manifest as manifest
    from recipec.runtime.ckpt_compat import model_record
    from recipec.runtime.model import build_model_chunks

    out = Path(out)
    console()
    hf_dir = require_hf_dir(hf_dir)
    started = Progress("hf-to-mcore")
    c = config if config is not None else compile_recipe(recipe, overrides, files, hf_dir)
    _warn_if_rounding(hf_dir, c)
    # The runtime pads the vocabulary for the recipe's TP; the checkpoint must have that shape.
    padded = c.model.padded_vocab_size(c.parallel.tensor_model_parallel_size)
    created = ensure_distributed()
    try:
        c = _init_model_parallel(c)
        on_gpu = torch.cuda.is_available()
        with _no_random_init():
            chunks, _ = build_model_chunks(c, padded, on_gpu=on_gpu)
        load_hf_into_chunks(hf_dir, chunks, c, padded)
        read_in = started.elapsed()
        # The same save as a training run's (runtime/checkpoint.save): sha256-hashed manifest, the model
        # record a resume or checkpoint.pretrained compares, atomic rename, `latest`; weights only
        # (no optimizer, no RNG state), so its layout never equals a run's.
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        source = str(hf_dir.resolve())
        final = ckpt.save(out, 0, chunks, None, None, f"hf:{source}", keep_last=None, sharding="none",
                          device=device, model={**model_record(c, padded), "converted_from": source})
        if dist.get_rank() == 0:
            log.info(f"converted {hf_dir} -> {final} ({size(manifest.total_bytes(final) or 0)}) in "
                     f"{started.elapsed()} ({read_in} to build the model and read the weights)")
        return final
    finally:
        if created:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


# ---------------------------------------------------------------- mcore -> HF
def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a checkpoint root (`latest`, else the newest complete iter_*) or itself."""
    from recipec.runtime import checkpoint as ckpt

    p = Path(path)
    if (p / "metadata.json").is_file() or (p / ".metadata").is_file():
        return p
    marker = p / ckpt.LATEST
    if marker.is_file():
        step_dir = p / f"iter_{int(marker.read_text().strip()):07d}"
        if step_dir.is_dir():
            return step_dir
    steps = sorted(ckpt.complete_steps(p))
    if steps:
        return p / f"iter_{steps[-1]:07d}"
    raise HFConvertError(f"{p} holds no recipec/Megatron dist checkpoint (no `latest`, no iter_*/)")


@contextmanager
def _reading(step_dir: Path) -> Iterator[None]:
    """A checkpoint that cannot be read is the file's fault: one HFConvertError naming it.

    Covers torch DCP's CheckpointException (a BaseException, so `except Exception` misses it),
    Megatron's CheckpointingException, a refused pickle (runtime/safe_load.py) and plain I/O."""
    import pickle

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from recipec.runtime.safe_load import refusal
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, CheckpointingException, pickle.UnpicklingError, OSError, EOFError, ValueError) as exc:
        text = str(exc).strip()
        detail = refusal(exc) or (text.splitlines()[0] if text else type(exc).__name__)
        raise HFConvertError(f"{step_dir} cannot be read as a dist checkpoint ({type(exc).__name__}: {detail[:300]}); "
                             "is it damaged, or not a recipec/Megatron checkpoint?") from None


def _prepend_axes(key: str) -> int:
    """Axes Megatron prepends to a checkpoint tensor: layer (unless saved per layer, `decoder.layers.<n>.`,
    as with a moe_layer_freq list), then expert for SequentialMLP's experts."""
    if not key.startswith("decoder.layers."):
        return 0
    experts = 1 if ".experts.experts." in key else 0
    return experts if key.split(".")[2].isdigit() else 1 + experts


class _ShardWriter:
    """safetensors shards of at most max_bytes, then the index (as save_pretrained names them)."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[str, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending), self.size))
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.written)
        names = []
        weight_map: dict[str, str] = {}
        for i, (tmp, keys, _size) in enumerate(self.written, 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            total = sum(s for _, _, s in self.written)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def mcore_to_hf(ckpt_dir: str | Path, out: str | Path, *, recipe: str | None = None, overrides: Sequence[str] = (),
                files: Sequence[str] = (), max_shard_size: int = 5 * 1024**3, merge_lora: bool = False,
                config: RecipeConfig | None = None) -> Path:
    """Write an HF directory (safetensors shards, index, config.json, tokenizer files) from a dist checkpoint.

    `config`: the compiled recipe the checkpoint was trained with (what the CLI passes); else
    `recipe` (required then) + `overrides`/`files` are compiled."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    console()
    started = Progress("mcore-to-hf")
    step_dir = resolve_checkpoint(ckpt_dir)
    c = config if config is not None else compile_recipe(recipe, overrides, files, None)
    extra = plan_export(c)  # reads the tokenizer now: a missing one fails before any weight is written
    m = c.model
    out = Path(out)
    created = ensure_distributed()
    try:
        if dist.get_world_size() != 1:
            raise HFConvertError("mcore-to-hf runs as one process (it reads the checkpoint layer by layer); "
                                 "start it without torchrun")
        with _reading(step_dir):
            metadata = dist_checkpointing.load_tensors_metadata(str(step_dir))
        model_keys = {k: v for k, v in metadata.items()
                      if k.split(".")[0] in ("embedding", "decoder", "output_layer") and not k.endswith("_extra_state")}
        lora = adapters_for_merge(model_keys, step_dir, c, merge_lora)  # LoRA/DoRA adapters: merged, or refused
        emb = model_keys.get("embedding.word_embeddings.weight")
        if emb is None:
            raise HFConvertError(f"{step_dir} has no embedding.word_embeddings.weight; is it a GPT checkpoint?")
        padded = int(emb.global_shape[0])
        mapping = ArchMapping(m.architecture, model_shape(c, padded))
        # The export's one dtype: the checkpoint's parameter dtype (the local spec keeps its norms in
        # fp32 under bf16; a model converted from bf16 HF weights gives them back exactly).
        dtype = emb.dtype
        out.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(out, max_shard_size)
        produced: set[str] = set()

        def emit(key: str) -> None:
            """Load checkpoint tensor `key` whole (all layers/experts of one weight), emit its HF tensors;
            slices `X[i]` of a stacked HF tensor are collected and written as X once all are there."""
            meta = model_keys[key]
            whole = ShardedTensor.from_rank_offsets(key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype),
                                                    replica_id=0)
            with _reading(step_dir):
                tensor = dist_checkpointing.load({"t": whole}, str(step_dir))["t"]
            tensor = lora.merge(key, tensor) if lora else tensor
            axes = _prepend_axes(key)
            stacks: dict[str, dict[int, torch.Tensor]] = {}
            for prefix in itertools.product(*(range(n) for n in tensor.shape[:axes])):
                part = tensor[prefix] if prefix else tensor
                for name, t in mapping.to_hf(mapping.canonical_name(key, prefix), part).items():
                    produced.add(name)
                    base, index = stacked_name(name)
                    if index is None:
                        writer.add(name, t.to(dtype).clone())  # one dtype, as save_pretrained writes
                        continue
                    slices = stacks.setdefault(base, {})
                    slices[index] = t.to(dtype)
                    if len(slices) == (m.num_moe_experts or 0):
                        writer.add(base, torch.stack([slices[i] for i in range(len(slices))]))
                        del stacks[base]
            for base, slices in stacks.items():
                raise HFConvertError(f"{step_dir}: {key} gives {len(slices)} of the {m.num_moe_experts} expert slices "
                                     f"of {base}; does the recipe describe this checkpoint?")
            del tensor

        keys = sorted(model_keys)
        if m.share_embeddings_and_output_weights:
            keys = [k for k in keys if k != "output_layer.weight"]
        progress = Progress(f"exporting {step_dir}", total=len(keys), unit="checkpoint tensors")
        for done, key in enumerate(keys, 1):
            emit(key)
            progress.update(done)
        hf_names = set()
        for name in mapping.mcore_names(m.num_layers, m.num_moe_experts, m):
            rule, idx = mapping.rule_for(name)
            hf_names.update(mapping.fill(h, idx) for h in rule.hf)
        missing = sorted(hf_names - produced)
        if missing:
            raise HFConvertError(f"{step_dir} lacks the Megatron tensors for {len(missing)} HF tensors, e.g. "
                                 f"{missing[:3]}; does the recipe describe this checkpoint?")
        shards = writer.finish()
        written = write_export_files(out, extra, c, _DTYPE_NAMES.get(dtype, "float32"))
        log.info("wrote %s (%d tensors in %s; %s) in %s", out, len(produced), ", ".join(shards), ", ".join(written),
                 started.elapsed())
        return out
    finally:
        if created:
            dist.destroy_process_group()
