"""Packed SFT (`data.packing = true`) on CPU with real Megatron-Core and real launches.

Model level (one torchrun rank, fp32, the tiny Llama's local layers + SDPA): the per-example
losses of a packed sequence equal those of the same examples run one per padded sequence, and
attention is blocked at example boundaries (the second example's logits do not move when the
first example's tokens change; without the packing they do, so the check can fail).

Run level (`recipec launch llama3_tiny_sft_packed`): the loss falls, the packing efficiency and
the start-up line are reported, a run resumed mid-way reproduces the uninterrupted losses, and
TP=2 and DP=2 give the losses of TP=1/DP=1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from launch_helpers import torchrun_cmd
from test_sft_e2e import reverse_task
from test_train_e2e import REPO, TOL, assert_close  # (puts tests/launch on sys.path)

RECIPE = "llama3_tiny_sft_packed"
STEPS = 4

# One rank builds the tiny model exactly as the runtime does and compares packed with unpacked.
MODEL_CHECK = r'''
import json, sys
import torch, torch.distributed as dist
from recipec.runtime.artifact import load_artifact
from recipec.runtime.device import activate_cpu_mode
from recipec.runtime.init import keyed_init
from recipec.runtime.model import build_model_chunks, init_model_parallel
from recipec.runtime.modes.sft_packing import collate_packed, pack_row, packed_seq_params
from recipec.runtime.sft import load_examples
from recipec.runtime.tokenizer import build_tokenizer

artifact, out = load_artifact(sys.argv[1]), sys.argv[2]
c = artifact.config
activate_cpu_mode()
dist.init_process_group("gloo")
init_model_parallel(c)
(model,), _ = build_model_chunks(c, artifact.plan.padded_vocab_size, on_gpu=False)
keyed_init([model], c.train.seed, c.model.init_method_std, c.model.num_layers)
model.eval()
s = c.model.seq_length
ex = load_examples(list(c.data.paths), build_tokenizer(c), s, "1,0,0", c.train.seed, Path(out).parent / "cache", "check")
lengths = ex.lengths(ex.train)
chosen, used = [], 0
for k, n in zip(ex.train.tolist(), lengths.tolist()):
    if used + n <= s - 5 and len(chosen) < 5:
        chosen.append(k); used += n

def forward(batch, packed, labels=True):
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"] if labels else None,
                     packed_seq_params=packed_seq_params(batch) if packed else None)

def per_example(batch, losses):
    cu, mask = batch["cu_seqlens"].tolist(), batch["loss_mask"][0]
    return [float((losses[0, a:b] * mask[a:b]).sum() / mask[a:b].sum()) for a, b in zip(cu[:-1], cu[1:])
            if mask[a:b].sum() > 0]

packed = collate_packed([pack_row(ex, chosen, s)])
got = per_example(packed, forward(packed, True))
alone = []
for k in chosen:
    one = collate_packed([pack_row(ex, [k], s)])  # one example, padded: plain causal attention
    alone += per_example(one, forward(one, False))

def second_logits(tokens, packed):
    batch = dict(packed_row, tokens=tokens)
    logits = forward(batch, packed, labels=False)  # [s, 1, vocab] or [1, s, vocab]
    logits = logits.reshape(-1, logits.shape[-1]) if logits.shape[0] == 1 else logits[:, 0]
    return logits[a:b]

packed_row = collate_packed([pack_row(ex, chosen[:2], s)])
cu = packed_row["cu_seqlens"].tolist()
a, b = cu[1], cu[2]
altered = packed_row["tokens"].clone()
altered[0, :cu[1]] = (altered[0, :cu[1]] * 7 + 13) % 256
if dist.get_rank() == 0:
    json.dump({"examples": len(chosen), "packed": got, "alone": alone,
               "blocked": float((second_logits(altered, True) - second_logits(packed_row["tokens"], True)).abs().max()),
               "unblocked": float((second_logits(altered, False) - second_logits(packed_row["tokens"], False)).abs().max())},
              open(out, "w"))
dist.destroy_process_group()
'''.replace("from recipec.runtime.tokenizer", "from pathlib import Path\nfrom recipec.runtime.tokenizer")


def recipec(*args: str, cwd: Path, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env(), check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"recipec {' '.join(args[:2])}: exited {proc.returncode}\n" + "\n".join(output.splitlines()[-60:]))
    return output


def _env() -> dict[str, str]:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RECIPEC_LAUNCH_TIME", None)
    return env


class PackedRun:
    """llama3_tiny_sft_packed launched through `recipec launch` in its own directory."""

    def __init__(self, root: Path, name: str, data: Path, *overrides: str, nproc: int = 1) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "out"
        self.args = [f"data.paths=[{json.dumps(str(data))}]", f"launch.gpus_per_node={nproc}",
                     f"launch.output_dir={self.out}", f"checkpoint.save={self.dir / 'ckpt'}", "checkpoint.save_interval=2",
                     "logging.log_interval=1", "train.eval_interval=2", "scheduler.lr_decay_iters=8", *overrides]

    def launch(self, *more: str) -> str:
        return recipec("launch", RECIPE, *self.args, *more, "-o", str(self.dir / "build"), cwd=self.dir)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    def losses(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for r in self.records():
            if "loss" in r:
                out[int(r["step"])] = float(r["loss"])  # type: ignore[arg-type]
        return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packed")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return reverse_task(root / "reverse.jsonl")


@pytest.fixture(scope="module")
def reference(root: Path, data: Path) -> tuple[PackedRun, str]:
    run = PackedRun(root, "reference", data)
    return run, run.launch(f"train.train_iters={STEPS}")


@pytest.fixture(scope="module")
def model_check(root: Path, data: Path) -> dict[str, object]:
    run = PackedRun(root, "model", data)
    recipec("build", RECIPE, *run.args, "-o", str(run.dir / "build"), cwd=run.dir)
    script = run.dir / "check.py"
    script.write_text(MODEL_CHECK)
    result = run.dir / "result.json"
    proc = subprocess.run(torchrun_cmd(1, str(script), str(run.dir / "build"), str(result)), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=_env(), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(result.read_text())


def test_packed_per_example_losses_equal_one_example_per_sequence(model_check: dict[str, object]) -> None:
    packed, alone = model_check["packed"], model_check["alone"]
    assert isinstance(packed, list) and isinstance(alone, list)
    assert model_check["examples"] >= 3 and len(packed) == len(alone) == model_check["examples"]
    diffs = [abs(p - a) for p, a in zip(packed, alone)]
    assert max(diffs) <= TOL, diffs


def test_attention_is_blocked_across_example_boundaries(model_check: dict[str, object]) -> None:
    assert model_check["blocked"] == 0.0 or model_check["blocked"] < 1e-6, model_check  # type: ignore[operator]
    assert model_check["unblocked"] > 1e-3, model_check  # the same change leaks without packing: the check bites  # type: ignore[operator]


def test_packed_sft_trains_and_reports_packing_and_startup(reference: tuple[PackedRun, str]) -> None:
    run, output = reference
    losses = run.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5, losses
    assert re.search(r"sft packing \(train\): 180 examples in \d+ sequences of 128 tokens, (9\d|8\d)\.\d% of tokens "
                     r"are not padding \(one per sequence: \d+\.\d%\)", output), output[-3000:]
    assert "train.mode: sft (packed sequences)" in output
    line = re.search(r"startup: imports [\d.]+ s, process group [\d.]+ s, model [\d.]+ s, optimizer [\d.]+ s, "
                     r"data [\d.]+ s, checkpoint load [\d.]+ s, first step [\d.]+ s; launch to first step [\d.]+ s$",
                     output, re.MULTILINE)
    assert line, output[-3000:]
    events = {r["event"]: r for r in run.records() if "event" in r}
    assert 0.8 < float(events["packing"]["efficiency"]) <= 1.0  # type: ignore[arg-type]
    startup = events["startup"]
    assert set(startup) >= {"imports_s", "process_group_s", "model_s", "optimizer_s", "data_s", "checkpoint_load_s",
                            "first_step_s", "launch_to_first_step_s"}


def test_packed_resume_reproduces_uninterrupted_losses(root: Path, data: Path,
                                                       reference: tuple[PackedRun, str]) -> None:
    run = PackedRun(root, "resumed", data)
    run.launch("train.train_iters=2")
    output = run.launch(f"train.train_iters={STEPS}")
    assert "continuing at step 3" in output
    assert "reused cached sft tokens" in output  # the tokenized file and the packing plan are cached
    assert_close(run.losses(), reference[0].losses(), range(1, STEPS + 1), "packed sft resumed at step 2")


@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2", "parallel.tensor_model_parallel_size=1"],
                         ids=["tp2", "dp2"])
def test_packed_two_ranks_match_one(root: Path, data: Path, reference: tuple[PackedRun, str], layout: str) -> None:
    run = PackedRun(root, layout.replace("=", "_"), data, layout, nproc=2)
    run.launch(f"train.train_iters={STEPS}")
    assert_close(run.losses(), reference[0].losses(), range(1, STEPS + 1), f"packed sft {layout} on 2 ranks")
