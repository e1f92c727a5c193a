"""What a person reads from a run: rank 0's voice, library noise filtered once, long steps timed.

Why this module: a one-rank CPU run of the tiny recipe used to print four kinds of library
warning per rank (Megatron's own deprecations, autograd's `.grad` of a non-leaf, torch.distributed
FutureWarnings), each with the source line that raised it, around ten lines of progress. None of
them can be acted on by whoever wrote the recipe; they are for recipec's developers. So:

- `setup(rank)`, once at the start of a rank (runtime/train.py): logging to stdout, INFO from
  rank 0 and warnings and errors from every rank (rank 0 plain, others tagged with their
  global rank, since torchrun's `[defaultN]:` prefix is the node-local rank); the warnings in
  `NOISE` ignored; the Python warnings that remain shown from rank 0 only (the ranks run the
  same code: rank 1's copy of a warning is rank 0's).
- `RECIPEC_VERBOSE=1` in the environment (`recipec launch --verbose`) turns all of that off:
  every rank logs INFO, Megatron's own INFO logs show, and every warning is shown
  (DeprecationWarnings included).
- `Progress`: a long operation (data packing, an HF conversion) says what it did and how long
  it took, and every `every_s` seconds how far it has got, from rank 0.
- `console()`: the same INFO lines for tools that run outside `train` (`recipec convert`),
  where nothing else has set up logging.

Errors are never touched: warnings filters only match warnings, logging levels never drop
ERROR, and a traceback is printed by Python, not by logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import NamedTuple

from recipec.compiler.supervisor import VERBOSE_ENV, is_verbose

log = logging.getLogger("recipec.runtime")

_LIBRARIES = r"(torch|megatron|transformer_engine|transformers|apex)(\.|$)"


class Noise(NamedTuple):
    """One warnings filter: `message` (a regex matched at the start, any case), `category`,
    `module` (a regex matched against the warning's module), and why nobody needs to see it."""

    message: str
    category: type[Warning]
    module: str
    why: str


NOISE: tuple[Noise, ...] = (
    Noise(r".*\bdeprecated\b", UserWarning, "megatron",
          "Megatron-Core's notes on its own arguments (GPTModel, TransformerConfig); 0.16 says 'full scope "
          "is deprecated' about its own default cuda_graph_scope on every TransformerConfig"),
    Noise("The .grad attribute of a Tensor that is not a leaf Tensor", UserWarning, "",
          "Megatron's optimizer probes `.grad` on every parameter, including views; harmless"),
    Noise(".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, "",
          "advice about CUDA streams: the plan sets the variable where it matters (GPU, TP or CP > 1)"),
    Noise(".*tp_group is None", DeprecationWarning, "", "Megatron's layers calling Megatron's layers"),
    Noise("torch.distributed is disabled, unavailable or uninitialized", UserWarning, "",
          "DCP's single-process save or load, which recipec convert uses on purpose"),
    Noise(".*(Apex|Transformer Engine).*not installed", Warning, "",
          "the layer spec in use is logged at start (Transformer Engine or local modules + SDPA)"),
    Noise("The pad token id in the tokenizer collides", UserWarning, "",
          "the byte tokenizer pads with end-of-text on purpose (pretraining packs; sft masks the padding)"),
    Noise("", FutureWarning, _LIBRARIES, "libraries' deprecations (torch.distributed's collectives, "
          "checkpointing): recipec's developers see them with --verbose"),
    Noise("", DeprecationWarning, _LIBRARIES, "as FutureWarning"),
)


def verbose(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was asked for every line (`recipec launch --verbose`)."""
    return is_verbose(os.environ if environ is None else environ)


class _Voice(logging.Formatter):
    """Rank 0's INFO lines as they are; warnings and errors say so, other ranks' say whose."""

    def __init__(self, rank: int) -> None:
        super().__init__("%(message)s")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text if self.rank == 0 else f"rank {self.rank}: {text}"


def _quiet_warnings(rank: int) -> None:
    for noise in NOISE:
        warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.module)
    if rank != 0:
        warnings.filterwarnings("ignore")  # rank 0 shows the same warnings, once
    # (warnings.showwarning stays Python's: builtin:tiny_corpus is made of the standard library's
    # docstrings, the warnings module's functions included, so replacing it would change the data.)


def _torch_dcp_records(record: logging.LogRecord) -> bool:
    """torch DCP logs a failed metadata read with its whole traceback (on the root logger) before
    raising; recipec's checkpoint loader reports the same failure in one line and falls back."""
    return record.levelno >= logging.ERROR or "torch/distributed/checkpoint/" not in record.pathname.replace("\\", "/")


def setup(rank: int, *, loud: bool | None = None) -> bool:
    """Configure this rank's logging and warnings (see the module doc); returns whether verbose."""
    loud = verbose() if loud is None else loud
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Voice(rank))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if loud:
        log.setLevel(logging.INFO)
        logging.getLogger("megatron").setLevel(logging.INFO)
        warnings.simplefilter("default")  # every warning once per place, DeprecationWarnings too
        return True
    # Warnings and errors from every rank; INFO (progress, libraries' notes) from rank 0 only.
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Megatron-Core logs every bucket's parameter list and its whole configs at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    handler.addFilter(_torch_dcp_records)
    _quiet_warnings(rank)
    return False


def env_rank() -> int:
    """This process's global rank as torchrun gives it (0 when it runs alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def console(rank: int | None = None) -> None:
    """For a tool run where nothing configured logging (`recipec convert`): INFO lines of
    recipec.runtime on stderr (rank 0's; warnings and errors from all), and the same noise
    filters as a training rank. A no-op where a handler exists (a training rank, pytest)."""
    if log.hasHandlers():
        return
    rank = env_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Voice(rank))
    log.addHandler(handler)
    loud = verbose()
    log.setLevel(logging.INFO if rank == 0 or loud else logging.WARNING)
    if not loud:
        _quiet_warnings(rank)


def seconds(elapsed: float) -> str:
    """A duration as a person says it: 0.42 s, 2.1 s, 3 min 05 s, 1 h 02 min."""
    if elapsed < 1:
        return f"{elapsed:.2f} s"
    if elapsed < 60:
        return f"{elapsed:.1f} s"
    minutes, secs = divmod(round(elapsed), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(nbytes: float) -> str:
    """A byte count as a person reads it: 812 B, 3.4 MiB, 15.02 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


class Progress:
    """Progress and duration of one long operation, for the log.

    `update(done)` logs `what: done/total unit, elapsed` at most every `every_s` seconds, so a
    short operation logs nothing until it ends and a long one shows it is alive; `elapsed()`
    is for the one line that says what was done and how long it took.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "", every_s: float = 10.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        count = f"{done:,}" + (f"/{self.total:,}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        log.info(f"{self.what}: {count}, {seconds(now - self.start)}")

    def elapsed(self) -> str:
        return seconds(time.perf_counter() - self.start)


__all__ = ["NOISE", "VERBOSE_ENV", "Noise", "Progress", "console", "env_rank", "seconds", "setup", "size", "verbose"]
