"""DPO's frozen reference model: a forward-only copy of the model, or the LoRA run's own chunks
with the adapters bypassed.

A copy is laid out like the trained model (same TP, same layer spec) and gets its weights from
`train.mode_options.reference` when set (a Hugging Face directory or a recipec checkpoint
directory), else from what the run started from: `checkpoint.pretrained`, or, without one, the
seeded init on CPU (runtime/init.keyed_init, a pure function of the seed, so a resumed run
rebuilds the same reference) and a copy of the trained chunks' weights on a GPU's fresh run.
It is never wrapped in DDP, never given to the optimizer and never saved: it is rebuilt
identically from its source on every start, resume included.

With LoRA and no `reference`, the base weights are frozen, so the start model is the trained
chunks with every adapter bypassed (`adapters_bypassed`): no second copy in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from recipec.compiler.errors import RecipeError

log = logging.getLogger("recipec.runtime")


@contextlib.contextmanager
def adapters_bypassed(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every LoRA/DoRA linear of `model` computes its base linear only (runtime/lora.py
    swaps each target's class for a subclass that adds the adapter; this swaps it back, and asks a
    TE layernorm-linear for its plain output again), and the model is in eval mode (no dropout)."""
    swapped: list[tuple[torch.nn.Module, type, Any]] = []
    training = model.training
    try:
        for module in model.modules():
            cls = type(module)
            if getattr(cls, "_recipec_lora", False) and "_recipec_lora" in cls.__dict__:
                ln_out = module.__dict__.get("return_layernorm_output", None)
                module.__class__ = cls.__mro__[1]
                if ln_out is not None:
                    module.return_layernorm_output = False
                swapped.append((module, cls, ln_out))
        model.eval()
        yield
    finally:
        for module, cls, ln_out in swapped:
            module.__class__ = cls
            if ln_out is not None:
                module.return_layernorm_output = ln_out
        model.train(training)


def build_reference(context: Any, trained: list[Any], source: str) -> list[torch.nn.Module]:
    """The reference model's chunks (frozen, eval mode) for this rank; `source` is the
    mode_options.reference value ("" = the run's start weights)."""
    from .. import checkpoint as ckpt
    from ..ckpt_compat import model_record
    from ..hf.reader import is_hf_dir
    from ..model import build_model_chunks

    c, padded = context.config, context.plan.padded_vocab_size
    chunks, _ = build_model_chunks(c, padded, on_gpu=context.on_gpu)
    path, key = (source, "train.mode_options.reference") if source else (c.checkpoint.pretrained,
                                                                          "checkpoint.pretrained")
    if path and is_hf_dir(path):
        from ..hf.convert import cpu_mode, load_hf_into_chunks

        if not context.on_gpu:
            cpu_mode()
        load_hf_into_chunks(path, chunks, c, padded)
        what = f"Hugging Face weights of {path} ({key})"
    elif path:
        if not Path(path).is_dir():
            raise RecipeError(f"{key}: no checkpoint directory at {path!r} for the DPO reference model; give a "
                              "recipec checkpoint directory or a Hugging Face directory (config.json + safetensors)")
        step = ckpt.load_latest(Path(path), chunks, None, None, "", with_optimizer=False, require=True,
                                model=model_record(c, padded), source=key)
        what = f"{path} step {step} ({key})"
    elif not context.on_gpu:
        from ..init import keyed_init

        keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
        what = "the seeded init of this run (no checkpoint.pretrained)"
    else:
        ck = c.checkpoint
        load_dir = ck.load or ck.save
        if load_dir and ckpt.has_checkpoints(Path(load_dir)):
            raise RecipeError("the DPO reference model is this run's start weights, but the run has no "
                              "checkpoint.pretrained and is resuming on a GPU, where the random init cannot be "
                              "rebuilt; set checkpoint.pretrained or train.mode_options.reference")
        for ref, own in zip(chunks, trained):
            ref.load_state_dict(getattr(own, "module", own).state_dict())
        what = "a copy of the trained model's start weights (no checkpoint.pretrained)"
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    log.info(f"dpo: reference model (frozen, forward only) from {what}")
    return chunks
