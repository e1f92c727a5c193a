"""Distillation (`train.mode = "distill"`) on CPU with real Megatron-Core and real launches.

Loss level: the vocab-parallel KL / cross entropy of runtime/modes/distill_loss.py, computed by
two gloo ranks on halves of the vocabulary, equals the single-process reference (torch's own
log_softmax / kl_div / cross_entropy), values and student gradients, at T = 1 and T = 2.

Run level (`recipec launch llama3_tiny_distill`, the teacher a llama3_tiny trained here for a few
steps): a student identical to its teacher has KL 0; a tinier student's KL to the teacher falls;
a run resumed from its mid-run checkpoint reproduces the uninterrupted losses; the teacher
exported to an HF directory gives the losses of its checkpoint; TP=2 and DP=2 give the losses of
TP=1/DP=1. The compiler half: the teacher's memory is in the plan, and a teacher
with another vocabulary is refused (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch
import torch.nn.functional as F
from recipec.runtime.modes.distill_loss import distill_loss
from test_packed_sft import recipec
from test_train_e2e import assert_close

RECIPE = "llama3_tiny_distill"
STEPS = 4
TEACHER_STEPS = 8
COMMON = ["logging.log_interval=1", "train.eval_interval=2", "train.eval_iters=1", "checkpoint.save_interval=2",
          "scheduler.lr_decay_iters=8", "train.global_batch_size=8", "train.micro_batch_size=4"]


# ---------------------------------------------------------------- the loss, against a reference
TEMPERATURES = (1.0, 2.0)
WEIGHT = 0.3
VOCAB = 10  # of 12 logits: ids 10 and 11 are Megatron's vocabulary padding, outside both softmaxes

# Two gloo ranks (a file store: no port), each with half of the vocabulary; imports torch only.
SHARDED = r'''
import sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from recipec.runtime.modes.distill_loss import distill_loss

def inputs(temperature):
    g = torch.Generator().manual_seed(int(temperature * 10))
    student = torch.randn(2, 5, 12, generator=g) * 3
    teacher = torch.randn(2, 5, 12, generator=g) * 3
    labels = torch.randint(0, 10, (2, 5), generator=g)
    mask = (torch.rand(2, 5, generator=g) > 0.3).float()
    return student, teacher, labels, mask

def worker(rank, out, temperatures, weight, vocab):
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2)
    results = {}
    for temperature in temperatures:
        student, teacher, labels, mask = inputs(temperature)
        part = slice(rank * 6, rank * 6 + 6)
        s = student[..., part].clone().requires_grad_(True)
        loss, metrics = distill_loss(s, teacher[..., part], labels, mask, temperature, weight, rank * 6, vocab,
                                     dist.group.WORLD)
        loss.backward()
        results[temperature] = {"loss": loss.item(), "kl": metrics["kl"].item(), "grad": s.grad}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], [float(t) for t in sys.argv[2:-2]], float(sys.argv[-2]), int(sys.argv[-1])),
             nprocs=2)
'''


def _inputs(temperature: float) -> tuple[torch.Tensor, ...]:
    namespace: dict[str, object] = {}
    exec(SHARDED.split("def worker")[0], namespace)  # the very inputs the script builds  # noqa: S102
    return namespace["inputs"](temperature)  # type: ignore[operator]


def _reference(temperature: float, w: float) -> tuple[float, float, torch.Tensor]:
    """torch's own log_softmax / kl_div / cross_entropy over the real vocabulary (the padding cut off)."""
    student, teacher, labels, mask = _inputs(temperature)
    s = student.clone().requires_grad_(True)
    real, t = s[..., :VOCAB], teacher[..., :VOCAB]
    kl = F.kl_div(F.log_softmax(real / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(real.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(2, 5)
    kl_mean, ce_mean = (kl * mask).sum() / mask.sum(), (ce * mask).sum() / mask.sum()
    loss = (1 - w) * ce_mean + w * temperature**2 * kl_mean
    loss.backward()
    return loss.item(), kl_mean.item(), s.grad


def test_vocab_parallel_loss_matches_single_process(tmp_path: Path) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out), *map(str, TEMPERATURES), str(WEIGHT), str(VOCAB)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for temperature in TEMPERATURES:
        loss, kl, grad = _reference(temperature, WEIGHT)
        student, teacher, labels, mask = _inputs(temperature)
        s = student.clone().requires_grad_(True)
        one, metrics = distill_loss(s, teacher, labels, mask, temperature, WEIGHT, 0, VOCAB)
        one.backward()
        assert abs(one.item() - loss) < 1e-5 and abs(metrics["kl"].item() - kl) < 1e-5
        assert torch.allclose(s.grad, grad, atol=1e-6)
        for p in parts:  # every TP rank holds the whole (replicated) loss
            assert abs(p[temperature]["loss"] - loss) < 1e-5 and abs(p[temperature]["kl"] - kl) < 1e-5
        # The gradient of each rank's slice, put together, is the whole vocabulary's.
        assert torch.allclose(torch.cat([p[temperature]["grad"] for p in parts], -1), grad, atol=1e-6)
        assert kl > 0.1  # the check bites: these logits are far apart
        assert grad[..., VOCAB:].abs().max() == 0  # padding ids get no gradient


def test_kl_of_identical_logits_is_zero() -> None:
    student, _, labels, mask = _inputs(1.0)
    _, metrics = distill_loss(student, student.clone(), labels, mask, 2.0, 0.5)
    assert abs(float(metrics["kl"])) < 1e-6


# ---------------------------------------------------------------- runs through `recipec launch`
class DistillRun:
    """llama3_tiny_distill (or llama3_tiny for the teacher) launched in its own directory."""

    def __init__(self, root: Path, name: str, *overrides: str, nproc: int = 1, recipe: str = RECIPE) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out, self.ckpt, self.recipe = self.dir / "out", self.dir / "ckpt", recipe
        self.args = [f"launch.gpus_per_node={nproc}", f"launch.output_dir={self.out}", f"checkpoint.save={self.ckpt}",
                     *COMMON, *overrides]

    def launch(self, *more: str) -> str:
        return recipec("launch", self.recipe, *self.args, *more, "-o", str(self.dir / "build"), cwd=self.dir)

    def column(self, name: str) -> dict[int, float]:
        out: dict[int, float] = {}
        path = self.out / "metrics.jsonl"
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if name in record and "loss" in record:
                out[int(record["step"])] = float(record[name])
        return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def teacher(root: Path) -> Path:
    """A llama3_tiny (4 layers, hidden 128) pretrained for a few steps: the teacher's checkpoint."""
    run = DistillRun(root, "teacher", f"train.train_iters={TEACHER_STEPS}", f"checkpoint.save_interval={TEACHER_STEPS}",
                     f"train.eval_interval={TEACHER_STEPS}", recipe="llama3_tiny")
    run.launch()
    return run.ckpt


@pytest.fixture(scope="module")
def reference(root: Path, teacher: Path) -> tuple[DistillRun, str]:
    run = DistillRun(root, "reference", f"train.mode_options.teacher_load={json.dumps(str(teacher))}")
    return run, run.launch(f"train.train_iters={STEPS}")


def test_teacher_equal_to_student_gives_zero_kl(root: Path, teacher: Path) -> None:
    same = [f"model.{k}={v}" for k, v in (("num_layers", 4), ("hidden_size", 128), ("ffn_hidden_size", 352))]
    run = DistillRun(root, "same", f"train.mode_options.teacher_load={json.dumps(str(teacher))}",
                     f"checkpoint.pretrained={json.dumps(str(teacher))}", *same)
    run.launch("train.train_iters=1")
    kl = run.column("kl")
    assert list(kl) == [1] and abs(kl[1]) < 1e-6, kl


def test_student_approaches_the_teacher(reference: tuple[DistillRun, str]) -> None:
    run, output = reference
    assert "train.mode: distill" in output
    assert "distillation teacher: 4 layers, hidden 128" in output, output[-3000:]
    kl, lm = run.column("kl"), run.column("lm loss")
    assert sorted(kl) == list(range(1, STEPS + 1))
    assert kl[1] > 0.1 and kl[STEPS] < 0.8 * kl[1], kl  # the student's distribution moves toward the teacher's
    assert lm[STEPS] < lm[1], lm


def test_resume_mid_run_reproduces_uninterrupted_losses(root: Path, teacher: Path,
                                                        reference: tuple[DistillRun, str]) -> None:
    ref = reference[0]
    run = DistillRun(root, "resumed", f"train.mode_options.teacher_load={json.dumps(str(teacher))}")
    # The reference run's step-2 checkpoint, as a run stopped there would have left it.
    run.ckpt.mkdir(parents=True)
    shutil.copytree(ref.ckpt / "iter_0000002", run.ckpt / "iter_0000002")
    (run.ckpt / "latest").write_text("2")
    output = run.launch(f"train.train_iters={STEPS}")
    assert "continuing at step 3" in output, output[-3000:]
    for name in ("loss", "kl", "lm loss"):
        assert_close(run.column(name), ref.column(name), range(3, STEPS + 1), f"distill {name} resumed at step 2")


def test_teacher_from_an_hf_directory_equals_the_checkpoint(root: Path, teacher: Path,
                                                           reference: tuple[DistillRun, str]) -> None:
    """The teacher exported to HF (no rows for the padded vocabulary) gives the same KL and losses."""
    hf = root / "teacher_hf"
    recipec("convert", "mcore-to-hf", str(teacher), "--recipe", "llama3_tiny", "-o", str(hf), cwd=root)
    run = DistillRun(root, "from_hf", f"train.mode_options.teacher_load={json.dumps(str(hf))}")
    output = run.launch("train.train_iters=2")
    assert "from Hugging Face weights" in output, output[-3000:]
    for name in ("loss", "kl"):
        assert_close(run.column(name), reference[0].column(name), range(1, 3), f"distill {name}, HF teacher")


@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2", "parallel.tensor_model_parallel_size=1"],
                         ids=["tp2", "dp2"])
def test_two_ranks_match_one(root: Path, teacher: Path, reference: tuple[DistillRun, str], layout: str) -> None:
    run = DistillRun(root, layout.replace("=", "_"), f"train.mode_options.teacher_load={json.dumps(str(teacher))}",
                     layout, nproc=2)
    run.launch(f"train.train_iters={STEPS}")
    for name in ("loss", "kl"):
        assert_close(run.column(name), reference[0].column(name), range(1, STEPS + 1), f"distill {name} {layout}")


# ---------------------------------------------------------------- the compiler half
def test_teacher_memory_is_in_the_plan(tmp_path: Path) -> None:
    from recipec.compiler.api import build

    plan = build("llama31_8b_to_llama32_1b_distill", []).plan
    frozen = plan.memory_gib["extra_models"]
    assert 14.0 < frozen < 16.0, plan.memory_gib  # Llama 3.1 8B in bf16, weights only
    sft = build("llama32_1b_sft_packed", []).plan
    assert plan.flops_per_step > sft.flops_per_step  # the teacher's forward passes


def test_the_bundled_teacher_is_llama31_8b() -> None:
    """The 8B -> 1B recipe's teacher_* keys on top of the 1B student give _models/llama31_8b's model."""
    from recipec.compiler.api import build
    from recipec.compiler.modes.distill import teacher_model

    teacher = teacher_model(build("llama31_8b_to_llama32_1b_distill", []).config)
    want = build("llama31_8b", []).config.model
    shape = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "kv_channels", "vocab_size", "share_embeddings_and_output_weights", "rope_scaling", "rope_scaling_factor",
             "rotary_base", "normalization", "activation", "max_position_embeddings")
    assert {k: getattr(teacher, k) for k in shape} == {k: getattr(want, k) for k in shape}


@pytest.mark.parametrize(("override", "key", "words"), [
    ("+train.mode_options.teacher_vocab_size=32000", "train.mode_options.teacher_vocab_size", "share the tokenizer"),
    ("+train.mode_options.teacher_num_attention_heads=3", "train.mode_options.teacher_num_query_groups",
     "teacher: num_attention_heads 3 is not divisible"),
    ("~train.mode_options.teacher_load", "train.mode_options.teacher_load", "needs the teacher's weights"),
], ids=["vocab", "heads", "no-teacher"])
def test_a_bad_teacher_is_refused(tmp_path: Path, override: str, key: str, words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.cli", "build", RECIPE, override,
                           "-o", str(tmp_path / "b")], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
