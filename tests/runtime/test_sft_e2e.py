"""data.kind = "sft" end to end: llama3_tiny (byte tokenizer) finetunes on a generated jsonl task with a
real `torchrun`; the response loss falls, and a run resumed from its checkpoint gives the same losses.
A malformed line stops the runtime with exit 2, the file and the line, and no traceback."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from test_train_e2e import Run, assert_close  # noqa: E402  (puts tests/launch on sys.path)

from launch_helpers import free_tcp_port  # noqa: E402

from recipec.compiler import build  # noqa: E402

WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow")


def reverse_task(path: Path, n: int = 200) -> Path:
    """n records "reverse: w1 w2 w3\\n" -> "w3 w2 w1": learnable from the prompt alone."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        lines.append(json.dumps({"prompt": f"reverse: {' '.join(words)}\n", "response": " ".join(reversed(words))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def sft(root: Path, name: str, data: Path, *overrides: str, nproc: int = 1) -> Run:
    return Run(root, name, nproc, "data.kind=sft", f"data.paths=[{json.dumps(str(data))}]", 'data.split="90,10,0"',
               "scheduler.lr_decay_iters=20", "train.eval_interval=10", "checkpoint.save_interval=10", *overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return reverse_task(root / "reverse.jsonl")


@pytest.fixture(scope="module")
def reference(root: Path, data: Path) -> tuple[Run, str]:
    run = sft(root, "reference", data, "train.train_iters=20")
    return run, run.run()


def test_sft_loss_falls(reference: tuple[Run, str]) -> None:
    run, output = reference
    losses = run.losses()
    assert sorted(losses) == list(range(1, 21))
    first, last = losses[1], sum(losses[s] for s in range(18, 21)) / 3
    assert first > 4.0 and last < first - 2.5, (first, last)
    assert "sft data: 200 examples from 1 file(s) -> train 180, valid 20, test 0" in output
    assert "eval at step 20" in output and "truncated" not in output


def test_sft_resume_gives_the_same_losses(root: Path, data: Path, reference: tuple[Run, str]) -> None:
    first = sft(root, "resumed", data, "train.train_iters=10")
    first.run()
    assert first.latest() == 10
    again = sft(root, "resumed", data, "train.train_iters=20")  # same directories: continues at step 11
    output = again.run()
    assert "continuing at step 11" in output and again.latest() == 20
    assert_close(again.losses(), reference[0].losses(), range(1, 21), "sft run resumed at step 10")


def test_sft_on_two_data_parallel_ranks_matches_one(root: Path, data: Path, reference: tuple[Run, str]) -> None:
    """Rank 0 tokenizes, rank 1 waits and reads the same cache; the global batches are the same."""
    run = sft(root, "dp2", data, "train.train_iters=10", nproc=2)
    run.run()
    assert len(list((run.out / "data" / "sft_cache").glob("*.npz"))) == 1
    assert_close(run.losses(), reference[0].losses(), range(1, 11), "sft DP=2 vs DP=1")


def test_malformed_sft_line_exits_2_naming_file_and_line(tmp_path: Path, data: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()[:5]
    lines[3] = '{"prompt": "reverse: cat dog\\n", "respones": "dog cat"}'
    bad.write_text("\n".join(lines) + "\n")
    directory = build("llama3_tiny", ["data.kind=sft", f"data.paths=[{json.dumps(str(bad))}]",
                                      f"launch.output_dir={tmp_path / 'out'}", "~checkpoint.save",
                                      "~checkpoint.save_interval", "~checkpoint.keep_last"]).write(tmp_path / "b")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_tcp_port()), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f'recipec: error: {bad}:4: missing "response"' in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
