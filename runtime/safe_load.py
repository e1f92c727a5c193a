"""Nothing the runtime reads unpickles code: weights-only `torch.load`, data-only DCP metadata.

A checkpoint is a file a user may have been handed. Two pickle readers sit on the path from
a checkpoint directory to the model, neither of them recipec's own code:

- `torch.load`: Megatron-Core loads `common.pt` and sharded objects with `torch.load(path)`
  (no `weights_only`), torch DCP loads byte items with `torch.load(..., weights_only=False)`.
  torch >= 2.6 defaults to weights-only, but `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` (which a
  recipe's launch.env or the user's shell can set) turns that off, and torch 2.4/2.5 default
  to full unpickling. `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` wins over both, even over an explicit
  `weights_only=False`, so the entry sets it and drops the other (`enforce_weights_only`).
- `pickle.load` of DCP's `.metadata` (torch.distributed.checkpoint.filesystem.FileSystemReader
  .read_metadata, reached by every Megatron `dist_checkpointing.load`): no torch setting
  covers it. `guard_dcp_metadata` swaps the `pickle` that module sees for one whose `load`
  only builds DCP's own dataclasses and enums, `torch.Size`, dtypes and layouts, which is all
  a `.metadata` file holds; anything else is refused with an `UnpicklingError` naming the file.

- `pickle.loads` of Transformer Engine's `_extra_state` (TE >= 2.0 stores its FP8 scaling state
  as a pickled byte tensor inside every checkpoint; TE's `set_extra_state` and Megatron-Core's
  `TEGroupedLinear._decode_extra_state` unpickle it). `guard_te_extra_state` gives those
  modules a `pickle` whose `loads` builds only tensors, containers, torch dtypes/sizes and TE's
  own recipe dataclasses and enums.

All are process-wide and idempotent; the runtime's entry points call `install()` before
they read anything.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import re
import sys
import types
from typing import Any, BinaryIO

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNSAFE = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)

# Modules whose dataclasses and enums make up a DCP `.metadata` file (pure data, no behaviour
# on construction).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


def enforce_weights_only() -> None:
    """Every torch.load in this process (and its children) loads weights only, whatever the caller asked."""
    for name in UNSAFE:
        os.environ.pop(name, None)
    os.environ[FORCE] = "1"


class DataOnlyUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: every global is checked against the allowlist."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            source = getattr(self, "source", "a checkpoint's .metadata")
            raise pickle.UnpicklingError(
                f"{source} refers to {module}.{name}, which a checkpoint's metadata never holds; refusing "
                "to unpickle it (the file may be crafted to run code)")
        return obj


def _allowed(module: str, name: str) -> Any | None:
    import torch

    if "." in name:
        return None
    if module == "torch":
        value = getattr(torch, name, None)
        return value if (value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))) else None
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if module in _DCP_MODULES:
        import importlib

        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, type) and value.__module__ == module and (
                dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
            return value
    return None


def data_only_load(file: BinaryIO, **kwargs: Any) -> Any:
    """pickle.load for DCP metadata: refuses any global outside the allowlist."""
    unpickler = DataOnlyUnpickler(file, **kwargs)
    unpickler.source = getattr(file, "name", None) or "a checkpoint's .metadata"  # type: ignore[attr-defined]
    return unpickler.load()


def data_only_loads(data: bytes, **kwargs: Any) -> Any:
    return data_only_load(io.BytesIO(data), **kwargs)


class ExtraStateUnpickler(pickle.Unpickler):
    """Builds TE's FP8 extra state (tensors, dicts, TE recipe dataclasses) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_extra_state(module, name)
        if obj is None:
            raise pickle.UnpicklingError(
                f"a checkpoint's Transformer Engine _extra_state refers to {module}.{name}, which TE's "
                "FP8 state never holds; refusing to unpickle it (the file may be crafted to run code)")
        return obj


# Tensor rebuilders a pickled tensor names; `_load_from_bytes` runs torch.load, which
# `enforce_weights_only` makes weights-only.
_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
                   ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
                   ("torch.storage", "_load_from_bytes"), ("torch", "Tensor"),
                   ("torch.nn.parameter", "Parameter"),
                   # megatron-core >= 0.19 reduces storages to this weights-only torch.load
                   ("megatron.core.safe_globals", "safe_load_from_bytes")}
_TE_RECIPE_MODULES = ("transformer_engine.common.recipe",)


def _allowed_extra_state(module: str, name: str) -> Any | None:
    import importlib

    if (module, name) in _TENSOR_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module in _TE_RECIPE_MODULES and "." not in name:
        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, type) and value.__module__ == module and (
                dataclasses.is_dataclass(value) or issubclass(value, enum.Enum) or _is_namedtuple(value)):
            return value
        return None
    if module.startswith(TE_EXTRA_STATE_PACKAGES) and "." not in name:
        # Megatron's own recipe classes (TEDelayedScaling ...): dataclasses deriving from TE's Recipe.
        value = getattr(sys.modules.get(module), name, None)
        recipe_base = getattr(sys.modules.get(_TE_RECIPE_MODULES[0]), "Recipe", None)
        if (isinstance(value, type) and isinstance(recipe_base, type) and value.__module__ == module
                and dataclasses.is_dataclass(value) and issubclass(value, recipe_base)):
            return value
        return None
    return _allowed(module, name)


def _is_namedtuple(cls: type) -> bool:
    """TE's `Format` enum holds `_FormatHelper` namedtuples: plain data, built by tuple.__new__."""
    return issubclass(cls, tuple) and hasattr(cls, "_fields") and cls.__reduce_ex__ is tuple.__reduce_ex__


def extra_state_loads(data: bytes, **kwargs: Any) -> Any:
    """pickle.loads for TE's `_extra_state` bytes: refuses any global outside the allowlist."""
    return ExtraStateUnpickler(io.BytesIO(data), **kwargs).load()


# Where `_extra_state` is unpickled with a module-level `pickle`: TE's modules (module/base.py
# and ops/op.py in TE 2.20) and Megatron-Core's TE extension (0.16; 0.19 has its own SafeUnpickler).
TE_EXTRA_STATE_PACKAGES = ("transformer_engine.", "megatron.core.extensions.")
# TE >= 2.20 refuses pickled extra state unless this is set; with every unpickling module guarded
# the load is data-only, so the runtime sets it itself (else FP8 delayed-scaling runs cannot resume).
TE_PICKLE_OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def guard_te_extra_state() -> list[str]:
    """Swap the `pickle` of every loaded TE / Megatron-TE module for the extra-state-only one.

    Only where Transformer Engine is installed (importing it is what a TE run does anyway).
    Returns the modules guarded, so a test can check that the swap happened; when any are,
    TE's own opt-in for pickled extra state is set, since what it would unpickle is now data only."""
    import importlib
    import importlib.util
    import sys

    if importlib.util.find_spec("transformer_engine") is None:
        return []
    for name in ("transformer_engine.pytorch", "megatron.core.extensions.transformer_engine"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a TE that does not import is reported where the model is built
            continue
    guarded = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(TE_EXTRA_STATE_PACKAGES):
            continue
        current = getattr(module, "pickle", None)
        if current is pickle:
            module.pickle = _shim(loads=extra_state_loads, Unpickler=ExtraStateUnpickler)  # type: ignore[attr-defined]
        elif getattr(current, "loads", None) is not extra_state_loads:
            continue
        guarded.append(name)
    if guarded:
        os.environ[TE_PICKLE_OPT_IN] = "1"
    return sorted(guarded)


def _shim(**overrides: Any) -> types.SimpleNamespace:
    """A stand-in for the `pickle` module: everything as is (dumps included) except the readers."""
    shim = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    for key, value in overrides.items():
        setattr(shim, key, value)
    return shim


def guard_dcp_metadata() -> bool:
    """Make torch DCP's FileSystemReader read `.metadata` with the data-only unpickler; True if in place."""
    from torch.distributed.checkpoint import filesystem

    current = getattr(filesystem, "pickle", None)
    if isinstance(current, types.SimpleNamespace) and getattr(current, "load", None) is data_only_load:
        return True
    if current is not pickle:
        return False  # a torch that reads metadata some other way: nothing of ours to guard
    filesystem.pickle = _shim(load=data_only_load, loads=data_only_loads,  # type: ignore[attr-defined]
                              Unpickler=DataOnlyUnpickler)
    return True


def refusal(exc: BaseException) -> str | None:
    """A short account of a load that the guards above refused, or None if `exc` is not one.

    torch's own message ends by suggesting `weights_only=False`, the one thing not to do with a
    file one did not make; this says which global was refused instead."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return (f"it holds a pickle that refers to {found.group(1)}, which weights-only loading refuses "
                "(the file may be crafted to run code; never load it with weights_only=False unless you made it)")
    if "Weights only load failed" in text:
        return ("it holds a pickle that weights-only loading refuses (the file may be crafted to run code; "
                "never load it with weights_only=False unless you made it)")
    return text.splitlines()[0] if text else "a pickle the data-only loader refuses"


def install() -> None:
    """Every guard; called first by every runtime entry point."""
    enforce_weights_only()
    guard_dcp_metadata()
    guard_te_extra_state()
