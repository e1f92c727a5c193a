"""Runs that meet old state, end to end on the tiny recipe through a real torchrun (CPU, gloo).

A recipe relaunched into a run directory that holds checkpoints of another model stops (exit 2)
with the keys that differ and the ways out, and never marks the good checkpoints bad (from the
manifest's model record, and from Megatron's shape error for manifests without one). A finished
run extended by raising train.train_iters continues the saved LR schedule instead of jumping
back up; scheduler.override_opt_param_scheduler switches to the recipe's. Saves and loads log
their size and duration.

One trained run (10 steps, no lr_decay_iters: the schedule derives from train_iters, as a user's
does); every case works on its own copy of its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from recipec.compiler import build
from recipec.runtime.ckpt_manifest import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import torchrun_cmd  # noqa: E402

COMMON = ["logging.log_interval=1", "train.eval_interval=1000", "checkpoint.save_interval=5"]
MAX_LR, MIN_LR = 3e-3, 3e-4  # llama3_tiny's optimizer.lr and min_lr


class Run:
    """A compiled tiny recipe writing to `<root>/<name>/{out,ckpt}`, launched with torchrun."""

    def __init__(self, root: Path, name: str, *overrides: str) -> None:
        self.dir = root / name
        self.out, self.ckpt = self.dir / "out", self.dir / "ckpt"
        self.artifact = build("llama3_tiny", [*COMMON, f"launch.output_dir={self.out}", f"checkpoint.save={self.ckpt}",
                                              *overrides]).write(self.dir / "build")

    def run(self, rc: int = 0) -> str:
        command = torchrun_cmd(1, "-m", "recipec.runtime.train", "--artifact", str(self.artifact))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        output = proc.stdout + proc.stderr
        rank_rc = 0 if proc.returncode == 0 else int(m.group(1)) if (m := re.search(r"exitcode\s*:\s*(-?\d+)",
                                                                                      output)) else None
        if rank_rc != rc:
            pytest.fail(f"{self.dir.name}: the rank exited {rank_rc}, expected {rc}\n" + output[-6000:])
        return output

    def lrs(self) -> dict[int, float]:
        path = self.out / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return {r["step"]: r["lr"] for r in records if "lr" in r}


def _rank_traceback(output: str) -> bool:
    """Whether a rank printed a traceback through recipec's code (torchrun's own agent prints one too)."""
    return any(line.strip().startswith('File "') and "/runtime/" in line for line in output.splitlines())


def _snapshot(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("old_state")


@pytest.fixture(scope="module")
def trained(root: Path) -> tuple[Run, str]:
    """10 steps, checkpoints at 5 and 10; lr_decay_iters derived (= 10)."""
    run = Run(root, "trained", "train.train_iters=10")
    return run, run.run()


def _relaunch(root: Path, trained: Run, name: str, *overrides: str) -> Run:
    """A new build on a copy of the trained run's checkpoints (as a user relaunching into the same directory)."""
    run = Run(root, name, *overrides)
    shutil.copytree(trained.ckpt, run.ckpt)
    return run


def test_another_model_is_refused_by_name_and_the_checkpoints_are_left_alone(root: Path, trained: tuple[Run, str]) -> None:
    run = _relaunch(root, trained[0], "wider", "train.train_iters=20", "model.num_layers=6", "model.hidden_size=256")
    before = _snapshot(run.ckpt)
    output = run.run(rc=2)
    assert f"recipec: error: {run.ckpt / 'iter_0000010'} (checkpoint.save) holds a checkpoint of another model" in output
    for line in ("model.hidden_size: 128 -> 256", "model.num_layers: 4 -> 6"):
        assert line in output, output[-3000:]
    assert "launch.output_dir=" in output and f"mv {run.ckpt} {run.ckpt}.old" in output
    assert "CheckpointingException" not in output and not _rank_traceback(output), output[-3000:]
    # Refused before the model was built, and nothing marked bad.
    assert "layer spec:" not in output
    assert _snapshot(run.ckpt) == before
    assert verify(run.ckpt / "iter_0000010") is None and verify(run.ckpt / "iter_0000005") is None


def test_a_manifest_without_a_model_record_is_refused_from_the_shape_error(root: Path,
                                                                         trained: tuple[Run, str]) -> None:
    run = _relaunch(root, trained[0], "wider_old", "train.train_iters=20", "model.hidden_size=256")
    for path in run.ckpt.glob("iter_*/recipec_manifest.json"):  # as a recipec before the model record wrote it
        meta = json.loads(path.read_text())
        meta.pop("model", None), meta.pop("padded_vocab_size", None)
        path.write_text(json.dumps(meta))
    before = _snapshot(run.ckpt)
    output = run.run(rc=2)
    assert "holds a checkpoint whose tensors do not fit this model" in output and "Global shape mismatch" in output
    assert "manifest predates recipec's model record" in output and "launch.output_dir=" in output
    assert not _rank_traceback(output) and "unusable" not in output, output[-3000:]
    assert _snapshot(run.ckpt) == before, "a checkpoint of another model was marked bad"


def test_extending_a_finished_run_continues_its_lr_schedule(root: Path, trained: tuple[Run, str]) -> None:
    first, _ = trained
    run = _relaunch(root, first, "extended", "train.train_iters=20")
    output = run.run()
    saved = first.lrs()
    assert saved[10] == pytest.approx(MIN_LR)
    lrs = run.lrs()
    # The saved cosine ended at step 10: the LR stays at min_lr (it jumped to 1.65e-3 when
    # lr_decay_iters followed the new train_iters).
    assert [lrs[s] for s in range(11, 21)] == pytest.approx([MIN_LR] * 10), lrs
    line = next(x for x in output.splitlines() if "LR schedule:" in x)
    assert "continuing the saved one" in line and "by step 10" in line and "not this recipe's" in line
    assert "by step 20" in line and "scheduler.override_opt_param_scheduler=true" in line
    # Progress and duration of the load and of the saves.
    assert re.search(r"verifying \S+iter_0000010 \(\d+ files, [\d.]+ MiB\) before loading it", output), output[-3000:]
    assert re.search(r"resumed from \S+iter_0000010 at step 10.*: verified \d+ files \([\d.]+ MiB\) in [\d.]+ s, "
                     r"loaded in [\d.]+ s", output), output[-3000:]


def test_saves_log_their_size_and_duration(trained: tuple[Run, str]) -> None:
    run, output = trained
    for step in (5, 10):
        pattern = (rf"saved checkpoint {re.escape(str(run.ckpt))}/iter_{step:07d} \([\d.]+ MiB, written at [\d.]+ MiB/s\) "
                   r"in [\d.]+ s \(\+[\d.]+ s hashing in the background\)")
        assert re.search(pattern, output), output[-3000:]


def test_override_switches_to_the_recipes_schedule_and_a_math_change_warns(root: Path,
                                                                          trained: tuple[Run, str]) -> None:
    run = _relaunch(root, trained[0], "override", "train.train_iters=12", "scheduler.override_opt_param_scheduler=true",
                    "model.rotary_base=20000.0")
    output = run.run()
    # The recipe's cosine over 12 steps (1 warmup step), at step 11 of it.
    want = MIN_LR + 0.5 * (1 + math.cos(math.pi * 10 / 11)) * (MAX_LR - MIN_LR)
    assert run.lrs()[11] == pytest.approx(want, rel=1e-6)
    assert "LR schedule: this recipe's, as scheduler.override_opt_param_scheduler=true asks" in output
    assert "model.rotary_base: 10000.0 -> 20000.0" in output and "resumed from" in output
