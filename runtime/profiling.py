"""Step-range profiling: torch.profiler traces, or the CUDA profiler range nsys captures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recipec.compiler.schema import ProfilingConfig


class Profiler:
    """Profiles steps [profile_step_start, profile_step_end) on the configured ranks."""

    def __init__(self, cfg: ProfilingConfig, rank: int, out_dir: Path, on_gpu: bool) -> None:
        self.cfg = cfg
        self.active = rank in cfg.profile_ranks and (cfg.use_torch_profiler or (cfg.use_nsys and on_gpu))
        self.trace_dir = out_dir / "profile"
        self._torch: Any = None

    def before_step(self, step: int) -> None:
        if not self.active or step != self.cfg.profile_step_start:
            return
        if self.cfg.use_nsys:
            torch.cuda.profiler.start()
        if self.cfg.use_torch_profiler:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                                 on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.trace_dir)))
            self._torch.__enter__()

    def after_step(self, step: int) -> None:
        if self.active and step == self.cfg.profile_step_end:
            self.close()

    def close(self) -> None:
        if self._torch is not None:
            self._torch.__exit__(None, None, None)
            self._torch = None
        if self.active and self.cfg.use_nsys and torch.cuda.is_available():
            torch.cuda.profiler.stop()
        self.active = False
