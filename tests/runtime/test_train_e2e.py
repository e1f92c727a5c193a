"""The recipec runtime end to end on CPU: compile the bundled tiny recipe, run it with a
real `torchrun` (1 or 2 processes, gloo), and check what a user relies on: the loss falls,
TP/PP/DP layouts give the same losses, and checkpoints resume exactly — after a kill, after
SIGTERM, from a truncated checkpoint, and across a TP change.

All runs share one schedule (lr_decay_iters=10, so warmup and decay do not depend on a run's
own train_iters) and are module fixtures, because several tests read the same run.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("megatron.core")

from recipec.compiler import ArtifactError, build  # noqa: E402
from recipec.runtime.artifact import load_artifact  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import free_tcp_port, torchrun_cmd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
COMMON = ["scheduler.lr_decay_iters=10", "logging.log_interval=1", "train.eval_interval=5", "train.eval_iters=1",
          "checkpoint.save_interval=5", "checkpoint.keep_last=2"]


class Run:
    """One compiled tiny recipe in its own directory, launched with torchrun."""

    def __init__(self, root: Path, name: str, nproc: int, *overrides: str) -> None:
        self.dir = root / name
        self.out = self.dir / "out"
        self.ckpt = self.dir / "ckpt"
        self.nproc = nproc
        compiled = build("llama3_tiny", [*COMMON, f"launch.gpus_per_node={nproc}", f"launch.output_dir={self.out}",
                                         f"checkpoint.save={self.ckpt}", *overrides])
        self.artifact = compiled.write(self.dir / "build")

    def command(self) -> list[str]:
        return torchrun_cmd(self.nproc, "-m", "recipec.runtime.train", "--artifact", str(self.artifact))

    def env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}

    def run(self, timeout: int = 300) -> str:
        proc = subprocess.run(self.command(), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            pytest.fail(f"{self.dir.name}: exited {proc.returncode}\n" + "\n".join(output.splitlines()[-60:]))
        return output

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(), env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=self.dir, start_new_session=True)

    def losses(self) -> dict[int, float]:
        """step -> loss of the latest run that reached it."""
        out: dict[int, float] = {}
        path = self.out / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record["loss"]
        return out

    def latest(self) -> int | None:
        marker = self.ckpt / "latest"
        return int(marker.read_text()) if marker.exists() else None


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the condition:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.2)


def assert_close(got: dict[int, float], want: dict[int, float], steps: range, what: str) -> None:
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) <= TOL, f"{what}: |diff| per step {diffs}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def reference(root: Path) -> Run:
    """TP=1, one process, 10 uninterrupted steps with checkpoints at 5 and 10."""
    run = Run(root, "reference", 1, "train.train_iters=10")
    output = run.run()
    assert "layer spec: local+sdpa" in output or "layer spec: transformer_engine" in output
    return run


@pytest.fixture(scope="module")
def tp2(root: Path) -> Run:
    run = Run(root, "tp2", 2, "train.train_iters=5", "parallel.tensor_model_parallel_size=2")
    run.run()
    return run


def test_loss_falls_and_progress_is_logged(root: Path) -> None:
    run = Run(root, "long", 1, "train.train_iters=40", "~scheduler.lr_decay_iters", "checkpoint.save_interval=40",
              "logging.log_interval=10")
    output = run.run()
    losses = run.losses()
    assert sorted(losses) == list(range(1, 41))
    first, last = losses[1], sum(losses[s] for s in range(36, 41)) / 5
    assert first > 5.0 and last < first - 2.0, (first, last)
    assert "tok/s" in output and "ms/step" in output and "eval at step" in output
    assert "TFLOP/s" not in output  # no peak is known for a CPU: no made-up 0.0 TFLOP/s


def test_tensor_parallel_matches_single_rank(reference: Run, tp2: Run) -> None:
    assert_close(tp2.losses(), reference.losses(), range(1, 6), "TP=2 vs TP=1")


def test_pipeline_parallel_matches_single_rank(root: Path, reference: Run) -> None:
    run = Run(root, "pp2", 2, "train.train_iters=5", "parallel.pipeline_model_parallel_size=2")
    run.run()
    assert_close(run.losses(), reference.losses(), range(1, 6), "PP=2 vs PP=1")


def test_data_parallel_with_distributed_optimizer_matches_single_rank(root: Path, reference: Run) -> None:
    run = Run(root, "dp2", 2, "train.train_iters=5", "optimizer.use_distributed_optimizer=true")
    run.run()
    assert_close(run.losses(), reference.losses(), range(1, 6), "DP=2 vs DP=1")


def test_killed_run_resumes_with_the_same_losses(root: Path, reference: Run) -> None:
    run = Run(root, "killed", 1, "train.train_iters=10")
    proc = run.start()
    _wait_for(lambda: run.latest() is not None, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = run.latest()
    assert saved is not None and saved < 10
    run.run()
    assert_close(run.losses(), reference.losses(), range(saved + 1, 11), f"resumed after kill at {saved}")


def test_sigterm_saves_and_exits_cleanly_then_resumes(root: Path, reference: Run) -> None:
    run = Run(root, "sigterm", 1, "train.train_iters=10", "checkpoint.save_interval=100")
    proc = run.start()
    _wait_for(lambda: len(run.losses()) >= 2, proc)
    # The runtime process gets the signal (as from SLURM or `recipec launch` forwarding it);
    # torchrun then sees its worker exit 0 and exits 0 itself.
    workers = psutil.Process(proc.pid).children()
    assert workers, "torchrun has no worker"
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = run.latest()
    assert saved is not None and 2 <= saved < 10, saved
    run.run()
    assert_close(run.losses(), reference.losses(), range(saved + 1, 11), f"resumed after SIGTERM at {saved}")


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(root: Path, reference: Run) -> None:
    run = Run(root, "truncated", 1, "train.train_iters=10")
    run.run()
    newest = run.ckpt / "iter_0000010"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (run.out / "metrics.jsonl").unlink()
    output = run.run()
    assert "iter_0000010 is unusable" in output and "truncated" in output
    assert "resumed from" in output and "iter_0000005" in output
    assert_close(run.losses(), reference.losses(), range(6, 11), "resumed from the previous checkpoint")


def test_checkpoint_saved_under_tp2_resumes_under_tp1(root: Path, reference: Run, tp2: Run) -> None:
    run = Run(root, "tp2_to_tp1", 1, "train.train_iters=10", f"checkpoint.load={tp2.ckpt}")
    output = run.run()
    assert "resumed from" in output and "at step 5" in output
    assert_close(run.losses(), reference.losses(), range(6, 11), "TP=2 checkpoint continued under TP=1")


def test_auto_sharding_saves_fast_during_the_run_and_portable_at_its_end(root: Path, reference: Run) -> None:
    """checkpoint.optimizer_sharding='auto': the periodic save at step 5 is dp_reshardable (no gather:
    the ~60 s a 1B save spent gathering on an H200), the final one at step 10 fully_reshardable; a
    periodic one under another TP is refused by name, the final one resumes under TP=2 (above, the
    other way round)."""
    sharding = {int(d.name[5:]): json.loads((d / "recipec_manifest.json").read_text())["optimizer_sharding"]
                for d in reference.ckpt.glob("iter_*")}
    assert sharding == {5: "dp_reshardable", 10: "fully_reshardable"}
    periodic = root / "periodic_only"
    shutil.copytree(reference.ckpt / "iter_0000005", periodic / "iter_0000005")
    run = Run(root, "periodic_under_tp2", 2, "train.train_iters=10", "parallel.tensor_model_parallel_size=2",
              f"checkpoint.load={periodic}")
    proc = subprocess.run(run.command(), env=run.env(), capture_output=True, text=True, timeout=300, cwd=run.dir)
    assert proc.returncode != 0
    assert "dp_reshardable optimizer state saved under TP 1" in proc.stdout + proc.stderr
    assert "run's final checkpoint" in proc.stdout + proc.stderr


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    directory = build("llama3_tiny").write(tmp_path / "build")
    plan = directory / "plan.json"
    data = json.loads(plan.read_text())
    data["config"]["train"]["train_iters"] = 7
    plan.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="modified after it was compiled"):
        load_artifact(directory)
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "modified after it was compiled" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_moe_with_expert_parallelism_trains(root: Path) -> None:
    run = Run(root, "moe_ep2", 2, "train.train_iters=6", "model.num_moe_experts=4", "model.moe_router_topk=2",
              "model.moe_ffn_hidden_size=128", "parallel.expert_model_parallel_size=2",
              "model.moe_token_dispatcher_type=allgather", "checkpoint.save_interval=6")
    run.run()
    losses = run.losses()
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.5, losses
    assert run.latest() == 6


def test_alltoall_dispatcher_on_cpu_is_refused_at_compile_time() -> None:
    from recipec.compiler import ValidationError

    with pytest.raises(ValidationError, match="allgather"):
        build("llama3_tiny", ["launch.gpus_per_node=2", "model.num_moe_experts=4",
                              "parallel.expert_model_parallel_size=2"])


def test_torch_compile_trains_like_eager(root: Path, reference: Run) -> None:
    run = Run(root, "compiled", 1, "train.train_iters=10", "train.torch_compile=true")
    output = run.run()
    assert "torch.compile: 4 transformer layers compiled" in output and "layer spec: local+sdpa" in output
    assert_close(run.losses(), reference.losses(), range(1, 11), "torch.compile vs eager")


def test_cuda_graphs_without_a_gpu_are_a_clear_error(tmp_path: Path) -> None:
    directory = build("llama3_tiny", ['launch.accelerator="H100-80GB"', 'precision.dtype="bf16"',
                                      'train.cuda_graph="full_iteration"']).write(tmp_path / "b")
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.cuda_graph='full_iteration' needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_transformer_engine_demanded_but_absent_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine imports here")
    except Exception:  # noqa: BLE001
        pass
    directory = build("llama3_tiny", ['model.transformer_impl="transformer_engine"']).write(tmp_path / "b")
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'model.transformer_impl="transformer_engine"' in proc.stderr and "Traceback" not in proc.stderr


LORA = ["peft.method=lora", "peft.lora_rank=8", "peft.lora_alpha=16", "optimizer.lr=1e-2"]


@pytest.fixture(scope="module")
def lora_base(root: Path) -> Run:
    """A short full-training run whose checkpoint is the LoRA runs' checkpoint.pretrained."""
    run = Run(root, "lora_base", 1, "train.train_iters=3", "checkpoint.save_interval=3", "train.eval_interval=100")
    run.run()
    return run


@pytest.fixture(scope="module")
def lora_ref(root: Path, lora_base: Run) -> tuple[Run, str]:
    run = Run(root, "lora_ref", 1, "train.train_iters=10", f"checkpoint.pretrained={lora_base.ckpt}", *LORA)
    return run, run.run()


@pytest.fixture(scope="module")
def lora_tp2(root: Path, lora_base: Run) -> Run:
    run = Run(root, "lora_tp2", 2, "train.train_iters=5", "parallel.tensor_model_parallel_size=2",
              f"checkpoint.pretrained={lora_base.ckpt}", *LORA)
    run.run()
    return run


def _model_tensors(step_dir: Path) -> dict[str, object]:
    """The model tensors of a dist checkpoint, read without Megatron (torch DCP reader)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata()
    names = [k for k, v in meta.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata) and not k.startswith(("optimizer", "rng"))]
    state = {k: torch.empty(meta.state_dict_metadata[k].size, dtype=meta.state_dict_metadata[k].properties.dtype)
             for k in names}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def test_lora_trains_only_adapters_and_loss_falls(lora_base: Run, lora_ref: tuple[Run, str]) -> None:
    run, output = lora_ref
    assert "started from the weights of" in output
    assert "LoRA: " in output and " trainable of " in output
    losses = run.losses()
    assert sorted(losses) == list(range(1, 11))
    assert sum(losses[s] for s in range(8, 11)) / 3 < losses[1] - 0.2, losses
    base = _model_tensors(lora_base.ckpt / "iter_0000003")
    tuned = _model_tensors(run.ckpt / "iter_0000010")
    adapters = {k for k in tuned if ".adapter." in k}
    assert adapters and set(tuned) - adapters == set(base)
    changed = [k for k in base if not bool((tuned[k] == base[k]).all())]
    assert not changed, f"base weights moved under LoRA: {changed}"
    assert any(bool(tuned[k].any()) for k in adapters if "linear_out" in k), "B stayed zero: adapters did not train"


def test_lora_tensor_parallel_matches_single_rank(lora_ref: tuple[Run, str], lora_tp2: Run) -> None:
    assert_close(lora_tp2.losses(), lora_ref[0].losses(), range(1, 6), "LoRA TP=2 vs TP=1")


def test_lora_checkpoint_saved_under_tp2_resumes_under_tp1(root: Path, lora_base: Run, lora_ref: tuple[Run, str],
                                                          lora_tp2: Run) -> None:
    run = Run(root, "lora_resume", 1, "train.train_iters=10", f"checkpoint.load={lora_tp2.ckpt}",
              f"checkpoint.pretrained={lora_base.ckpt}", *LORA)
    output = run.run()
    assert "resumed from" in output and "at step 5" in output and "started from the weights" not in output
    assert_close(run.losses(), lora_ref[0].losses(), range(6, 11), "LoRA TP=2 checkpoint continued under TP=1")


def test_divergence_stops_without_overwriting_the_last_good_checkpoint(root: Path) -> None:
    run = Run(root, "diverged", 1, "train.train_iters=10", "optimizer.lr=10", "optimizer.min_lr=0",
              "scheduler.lr_warmup_fraction=0", "checkpoint.save_interval=1")
    proc = subprocess.run(run.command(), env=run.env(), capture_output=True, text=True, timeout=300, cwd=run.dir)
    assert proc.returncode != 0
    assert "training diverged: gradient norm is nan" in proc.stdout + proc.stderr
    saved = run.latest()
    assert saved is not None and saved < 10
    assert all(json.loads((p / "recipec_manifest.json").read_text())["step"] <= saved
               for p in run.ckpt.glob("iter_*"))


def test_missing_data_files_are_a_clear_error(tmp_path: Path) -> None:
    directory = build("llama3_tiny", ["data.kind=indexed", 'data.paths=["nowhere/corpus_text_document"]',
                                      "tokenizer.type=null"]).write(tmp_path / "b")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_tcp_port()), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "[data.paths] no indexed dataset" in proc.stderr
    assert "nowhere/corpus_text_document" in proc.stderr and "Traceback" not in proc.stderr
