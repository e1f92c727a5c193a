"""Torch Adam inside Megatron-Core's distributed optimizer: the state fixes a checkpoint load needs.

Without Apex or Transformer Engine (always on CPU; on a GPU where neither is installed) Megatron
falls back to torch.optim.Adam, whose per-parameter ``step`` tensor some of Megatron's load paths
drop or overwrite. TE's and Apex's FusedAdam keep the step in the param groups and are left alone.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch


def prime_optimizer_state_for_load(optimizer: Any) -> None:
    """Give a fresh torch Adam/AdamW inside a Megatron optimizer zero state before loading.

    Without Apex/TE (always the case on CPU) ``DistributedOptimizer.state_dict()``, which
    ``sharded_state_dict(is_loading=True)`` calls, asserts that the inner torch optimizer
    holds exactly one per-parameter ``step`` value; a never-stepped torch Adam has none.
    Zero moments and ``step=0`` are what an untouched Adam means and are overwritten by
    the load.  Safe to call on any Megatron optimizer (chained or not); it only fills
    empty states of torch.optim.Adam/AdamW.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        keep_adam_step_on_load()  # torch Adam on a GPU too (no Apex/TE): not only in CPU mode
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def keep_adam_step_on_load() -> bool:
    """Keep torch Adam's loaded ``step`` when the distributed optimizer loads param state.

    Without Apex/TE, ``DistributedOptimizer.load_state_dict`` sets every parameter's Adam
    ``step`` from the checkpoint's ``param_groups[i]['step']`` and then calls a
    ``load_parameter_state_from_*`` loader, which goes through
    ``_set_main_param_and_optimizer_states``; that copies *every* key of the live state,
    ``step`` included, from the loaded tensors.  In megatron-core 0.16.1 'fully_reshardable'
    and 'fully_sharded_model_space' drop ``step`` (KeyError), and 'dp_reshardable' carries
    the pre-load ``step`` back over the restored one (Adam bias correction restarts).
    Worse, ``load_state_dict`` gives all parameters the *same* step tensor, which torch
    Adam then increments once per parameter per step.  The patch gives each parameter its
    own copy of the restored ``step`` and feeds that through instead.  Needed wherever the
    distributed optimizer runs torch Adam: CPU mode, and a GPU without Apex/TE (an H200 with
    megatron-core 0.19 and no TE could not resume its final, fully_reshardable checkpoint:
    KeyError 'step'); TE's and Apex's FusedAdam keep no per-parameter step and pass through.
    """
    try:
        mod = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    except ImportError:
        return False
    cls = getattr(mod, "DistributedOptimizer", None)
    orig = vars(cls).get("_set_main_param_and_optimizer_states") if cls else None
    if orig is None or getattr(orig, "__recipec_cpu__", False):
        return False

    @functools.wraps(orig)
    def set_states(self: Any, model_param: torch.Tensor, tensors: dict) -> Any:
        index = getattr(self, "model_param_group_index_map", {}).get(model_param)
        if index is not None and not getattr(
            self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
        ):
            main_param = self.optimizer.param_groups[index[0]]["params"][index[1]]
            live = self.optimizer.state.get(main_param, {})
            if "step" in live:
                # load_state_dict assigned ONE tensor to every parameter's step; torch Adam
                # increments step in place per parameter, so un-share it as well.
                live["step"] = live["step"].detach().clone()
                tensors = {**tensors, "step": live["step"]}
        return orig(self, model_param, tensors)

    set_states.__recipec_cpu__ = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states
    return True
