"""Device layer: run Megatron-Core on CPU (gloo) when no CUDA device exists.

Megatron-Core hard-codes CUDA all over its training path (``torch.cuda.current_device()``
as an allocation device, ``device='cuda'`` literals, CUDA streams/events, the CUDA RNG
tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks).  On a CPU-only torch build
each of those raises.  ``activate_cpu_mode()`` redirects them to the CPU, so tiny GPT
models can be trained and checkpointed on a laptop/CI box with ``torchrun`` + gloo.  It is
a no-op when ``torch.cuda.is_available()``; on GPUs Megatron runs untouched.

What is redirected (and why), read off megatron-core 0.16.1 and exercised by
tests/runtime on 0.16.1 and 0.19.2 (0.19 additionally needs the ``triton`` wheel, which its
MoE paged_stash module imports unconditionally; it imports fine without a GPU).  Every
patch is guarded, so a module or symbol missing in another version is skipped:

1. *CUDA shim namespace* (``_CUDA_ON_CPU_MODULES``).  In each listed Megatron module the
   module-global name ``torch`` is replaced by ``_CpuTorch``, a proxy that forwards
   everything to the real ``torch`` except:

   - ``torch.cuda``: ``current_device()`` -> ``torch.device('cpu')`` (used as allocation
     device by tensor_parallel.layers/mappings/data, p2p_communication, param_and_grad_buffer,
     distrib_optimizer, gpt_model, attention, utils); ``synchronize/empty_cache`` -> no-op
     (parallel_state, p2p_communication, DDP, dist_checkpointing); ``Stream/stream/
     current_stream/default_stream/Event`` -> inert objects (DDP communication stream,
     param_and_grad_buffer overlap code, utils timers); ``get_rng_state/set_rng_state/
     manual_seed`` -> the CPU default generator (tensor_parallel.random
     ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed``); ``nvtx`` ->
     no-op; ``is_available()`` stays False.
   - tensor factories (``zeros``, ``empty``, ``tensor``, ...): a ``device`` that names CUDA
     (``'cuda'``, ``cuda:N``, an int) becomes CPU and ``pin_memory`` is dropped.  This covers
     the ``device='cuda'`` literals in optimizer.clip_grads (grad norm / count zeros),
     optimizer.optimizer (found_inf, scale), utils (l2 norm fallback), transformer.utils
     (``get_default_causal_mask``), pipeline_parallel.schedules (``total_num_tokens``),
     param_and_grad_buffer, and dist_checkpointing exchange/state_dict_saver.

   The proxy is per module, so code outside Megatron (and torch itself) is unaffected.

2. *RNG state functions*: ``tensor_parallel.random._get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` -> ``torch.get_rng_state`` / ``torch.set_rng_state``, so the
   ``CudaRNGStatesTracker.fork()`` swaps the CPU generator (dropout, GPU-style init).

3. *CUDA type-name checks*: ``DistributedOptimizer._build_model_and_main_param_groups``,
   ``Float16OptimizerWithFloat16Params.__init__`` and
   ``clip_grads.clip_grad_by_total_norm_fp32`` compare ``param.type()`` with
   ``'torch.cuda.FloatTensor'`` etc.  They run with ``Tensor.type()`` temporarily reporting
   the CUDA name of CPU tensors (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``).

4. *``Tensor.cuda()`` calls*: ``LanguageModule.setup_embeddings_and_output_layer`` moves
   the tied embedding weight with ``.cuda()`` before its all-reduce (PP>1 with tied
   embeddings) and ``DistributedOptimizer.get_parameter_state_dp_zero`` (used by the
   'fully_reshardable' / 'dp_zero_gather_scatter' checkpoint formats) moves gather buffers
   with ``.cuda()``; they run with ``Tensor.cuda`` temporarily returning the tensor as is.

5. *torch Adam ``step`` on checkpoint load* (CPU means no Apex/TE, so Megatron falls back
   to torch Adam, whose per-parameter ``step`` some load paths mishandle): the fix lives in
   runtime/adam_state.py, because a GPU without Apex/TE runs torch Adam too; CPU mode
   installs it up front, every checkpoint load installs it on demand.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .adam_state import keep_adam_step_on_load

log = logging.getLogger(__name__)

_ACTIVE = False
#: What ``activate_cpu_mode`` patched, for logs and tests ("module:attr" strings).
PATCHED: list[str] = []

# Megatron modules whose global ``torch`` is swapped for the CPU proxy (item 1 above).
_CUDA_ON_CPU_MODULES: tuple[str, ...] = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.mlp",
    # Local attention for windows / softmax offsets (its learnable sink is allocated on current_device())
    # and multi-token prediction's loss tracker (runtime/layer_spec.py, recipec issue 12).
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # MoE: the router allocates on current_device(), the alltoall dispatcher makes a stream.
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
)

_FACTORIES: tuple[str, ...] = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "eye", "linspace",
    "rand", "randn", "randint", "randperm", "empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def device_for_runtime() -> torch.device:
    """The device the runtime should put models and batches on (current GPU, else CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _names_cuda(device: Any) -> bool:
    """True when ``device`` denotes a CUDA device (``'cuda'``, ``'cuda:1'``, ``0``, ...)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so a CUDA ``device`` argument allocates on the CPU instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` and ``torch.cuda.Event``.

    CPU ops are synchronous, so every wait/record/synchronize is a no-op (DDP's
    communication stream, param_and_grad_buffer overlap bookkeeping, utils timers).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    wait_event = record = wait = synchronize = wait_stream

    def record_event(self, event: Any = None) -> _NullStream:
        return event if event is not None else _NullStream()

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as seen by patched Megatron modules: CPU answers, real fallbacks."""

    def __init__(self) -> None:
        super().__init__("torch.cuda<cpu>")
        self.current_device = lambda: torch.device("cpu")
        self.is_available = lambda: False
        self.device_count = lambda: 0
        self.synchronize = _noop
        self.empty_cache = _noop
        self.reset_peak_memory_stats = _noop
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.memory_reserved = lambda *a, **k: 0
        self.Stream = _NullStream
        self.Event = _NullStream
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.current_stream = lambda *a, **k: _NullStream()
        self.default_stream = lambda *a, **k: _NullStream()
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.random = types.SimpleNamespace(
            get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state
        )
        self.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=lambda *a, **k: contextlib.nullcontext())

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """The ``torch`` seen by patched Megatron modules: CPU ``cuda`` and CPU factories."""

    def __init__(self) -> None:
        super().__init__("torch<cpu>")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            if hasattr(torch, name):
                setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


@contextlib.contextmanager
def _cuda_tensor_semantics() -> Iterator[None]:
    """Make CPU tensors pass Megatron's CUDA checks for the duration of one call.

    ``Tensor.type()`` (no argument) reports ``torch.cuda.<T>`` for CPU tensors and
    ``Tensor.cuda()`` returns the tensor itself.  Scoped, because torch and dist
    checkpointing legitimately rely on the real answers elsewhere.
    """
    orig_type, orig_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any):
        if dtype is None and not kw:
            name = orig_type(self)
            return name if self.is_cuda else name.replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, non_blocking, **kw)

    torch.Tensor.type = cuda_type  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = orig_type, orig_cuda  # type: ignore[method-assign]


def _with_cuda_semantics(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_semantics():
            return fn(*args, **kwargs)

    wrapper.__recipec_cpu__ = True  # type: ignore[attr-defined]
    return wrapper


def _import(name: str) -> types.ModuleType | None:
    """Import a Megatron module, or None when this Megatron version lacks it."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - absent/optional modules are skipped on purpose
        log.debug("cpu mode: skip %s (%s)", name, exc)
        return None


def _patch_function(module_name: str, attr: str, also_in: tuple[str, ...] = ()) -> None:
    """Wrap module-level function ``attr`` (and re-bindings of it in ``also_in``)."""
    mod = _import(module_name)
    orig = getattr(mod, attr, None) if mod else None
    if orig is None or getattr(orig, "__recipec_cpu__", False):
        return
    wrapped = _with_cuda_semantics(orig)
    setattr(mod, attr, wrapped)
    PATCHED.append(f"{module_name}:{attr}")
    for other in also_in:
        omod = _import(other)
        if omod is not None and getattr(omod, attr, None) is orig:
            setattr(omod, attr, wrapped)
            PATCHED.append(f"{other}:{attr}")


def _patch_method(module_name: str, cls_name: str, attr: str) -> None:
    """Wrap a (static/class/instance) method so it runs with CUDA tensor semantics."""
    mod = _import(module_name)
    cls = getattr(mod, cls_name, None) if mod else None
    if cls is None or attr not in vars(cls):
        return
    raw = vars(cls)[attr]
    if isinstance(raw, (staticmethod, classmethod)):
        if getattr(raw.__func__, "__recipec_cpu__", False):
            return
        new: Any = type(raw)(_with_cuda_semantics(raw.__func__))
    else:
        if getattr(raw, "__recipec_cpu__", False):
            return
        new = _with_cuda_semantics(raw)
    setattr(cls, attr, new)
    PATCHED.append(f"{module_name}:{cls_name}.{attr}")


def _patch_rng() -> None:
    """Point the tracker's CUDA RNG get/set at the CPU default generator (item 2)."""
    rnd = _import("megatron.core.tensor_parallel.random")
    if rnd is None:
        return

    def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        """CPU replacement for ``_get_cuda_rng_state`` (the state is already a copy)."""
        return torch.get_rng_state()

    def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        """CPU replacement for ``_set_cuda_rng_state``."""
        torch.set_rng_state(new_state)

    for attr, fn in (("_get_cuda_rng_state", _get_cpu_rng_state),
                     ("_set_cuda_rng_state", _set_cpu_rng_state)):
        if hasattr(rnd, attr):
            setattr(rnd, attr, fn)
            PATCHED.append(f"megatron.core.tensor_parallel.random:{attr}")


def activate_cpu_mode() -> bool:
    """Redirect Megatron-Core's CUDA calls to the CPU; returns True when CPU mode is on.

    Idempotent; does nothing (returns False) when CUDA is available.  Call it before
    building models/optimizers (it imports the Megatron modules it patches).
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    for name in _CUDA_ON_CPU_MODULES:
        mod = _import(name)
        if mod is not None and getattr(mod, "torch", None) is torch:
            mod.torch = _CPU_TORCH  # type: ignore[attr-defined]
            PATCHED.append(f"{name}:torch")
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]  # 0.16 leaves it undefined without TE
        PATCHED.append("megatron.core.transformer.moe.moe_utils:te_general_gemm")
    _patch_rng()
    _patch_method("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
                  "_build_model_and_main_param_groups")
    _patch_method("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
                  "get_parameter_state_dp_zero")
    _patch_method("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params",
                  "__init__")
    _patch_function("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
                    also_in=("megatron.core.optimizer.optimizer",
                             "megatron.core.optimizer.distrib_optimizer",
                             "megatron.core.optimizer"))
    if keep_adam_step_on_load():
        PATCHED.append("megatron.core.optimizer.distrib_optimizer:"
                       "DistributedOptimizer._set_main_param_and_optimizer_states")
    _patch_method("megatron.core.models.common.language_module.language_module",
                  "LanguageModule", "setup_embeddings_and_output_layer")
    _ACTIVE = True
    log.info("megatron cpu mode: %d patches", len(PATCHED))
    return True
