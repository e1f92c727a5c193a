"""Logs a person reads (issue 14, item 5): what `recipec launch` prints, quiet and with --verbose.

Two real CPU launches of llama3_tiny share one scratch directory (module fixture): a quiet one
(2 ranks, TP=2, so Megatron's TP notes would show up too) and then a --verbose one, which finds
the first one's data pack. Around them, cheap checks of the parts: torchrun's banner filter
against a real torchrun, the rank-side warnings filters in a bare interpreter (no torch), the
progress line with and without a known peak, and --verbose in a dry run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from launch_helpers import clean_env, recipec_cmd

pytestmark = [pytest.mark.timeout(600)]

PROGRESS = re.compile(r"step\s+(\d+)/(\d+) \| loss")
RANK_PREFIX = re.compile(r"^\[[A-Za-z][\w-]*?\d+\]:")
# What a quiet run must never print: issue 14 item 5's list, and the shape of any Python warning.
NOISE_MESSAGES = (
    "full scope is deprecated",
    "is deprecated",
    "attribute of a Tensor that is not a leaf",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "tp_group is None",
    "torch.distributed is disabled, unavailable or uninitialized",
    "Setting OMP_NUM_THREADS",
)
NOISE = (*NOISE_MESSAGES, "FutureWarning", "DeprecationWarning", "UserWarning", "warnings.warn(")
PACKED = re.compile(r"packed corpus builtin:tiny_corpus: [\d,]+ documents, [\d,]+ tokens in [\d.]+ s "
                    r"\(cached at \S+_text_document\.bin/\.idx\)")


def _launch(cwd: Path, *args: str) -> str:
    proc = subprocess.run(recipec_cmd("launch", *args), cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=540, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """(quiet output, verbose output, the run directory): both launches, in order, in one directory."""
    cwd = tmp_path_factory.mktemp("logs")
    common = ("llama3_tiny", "train.eval_interval=1000", "launch.output_dir=runs/logs")
    quiet = _launch(cwd, *common, "launch.gpus_per_node=2", "parallel.tensor_model_parallel_size=2",
                    "train.train_iters=10", "logging.log_interval=5", "checkpoint.save=runs/logs/quiet", "-o", "b/q")
    verbose = _launch(cwd, "--verbose", *common, "train.train_iters=1", "logging.log_interval=1",
                      "checkpoint.save=runs/logs/verbose", "-o", "b/v")
    return {"quiet": quiet, "verbose": verbose, "run_dir": cwd / "runs" / "logs"}


def test_a_quiet_run_prints_one_progress_line_per_interval_from_rank_0(runs: dict[str, object]) -> None:
    out = str(runs["quiet"])
    lines = [line for line in out.splitlines() if PROGRESS.search(line)]
    assert [PROGRESS.search(line).group(1) for line in lines] == ["5", "10"], out[-4000:]  # type: ignore[union-attr]
    assert all(line.startswith("[default0]:step") for line in lines), lines
    assert all("ms/step" in line and "tok/s" in line for line in lines), lines
    # no rank repeats another's words: with torchrun's prefix taken off, every line is different
    said = [RANK_PREFIX.sub("", line) for line in out.splitlines() if line.strip()]
    assert len(said) == len(set(said)), [line for line in said if said.count(line) > 1]


def test_a_quiet_run_shows_no_library_noise_and_no_made_up_throughput(runs: dict[str, object]) -> None:
    out = str(runs["quiet"])
    assert [n for n in NOISE if n in out] == [], out[-4000:]
    assert "TFLOP/s" not in out and "MFU" not in out  # no peak is known for "cpu"
    assert "Traceback" not in out


def test_metrics_jsonl_keeps_every_field(runs: dict[str, object]) -> None:
    records = [json.loads(line) for line in (Path(str(runs["run_dir"])) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "window_steps" in r]
    assert windows and set(windows[0]) >= {"step", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gib"}


def test_data_packing_says_what_it_did_and_how_long_it_took(runs: dict[str, object]) -> None:
    quiet, verbose = str(runs["quiet"]), str(runs["verbose"])
    assert len(PACKED.findall(quiet)) == 1, quiet[-4000:]
    assert re.search(r"reused cached pack \S+_text_document\.bin/\.idx for corpus builtin:tiny_corpus", verbose)


def test_verbose_reaches_the_ranks(runs: dict[str, object]) -> None:
    out = str(runs["verbose"])
    assert "full scope is deprecated" in out, out[-4000:]  # a filtered warning, shown again
    assert PROGRESS.search(out)


def test_verbose_in_a_dry_run_sets_the_variable_the_ranks_read(workdir: Path) -> None:
    proc = subprocess.run(recipec_cmd("launch", "--verbose", "--dry-run", "llama3_tiny", "-o", "out"), cwd=workdir,
                          env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "export RECIPEC_VERBOSE=1" in proc.stdout
    quiet = subprocess.run(recipec_cmd("launch", "--dry-run", "llama3_tiny", "-o", "out"), cwd=workdir,
                           env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == 0 and "RECIPEC_VERBOSE" not in quiet.stdout


@pytest.mark.parametrize("verbose", [False, True])
def test_torchruns_omp_banner_is_dropped_unless_verbose(tmp_path: Path, verbose: bool) -> None:
    """A real torchrun (two ranks of a trivial module, no OMP_NUM_THREADS) under the supervisor."""
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    env["RECIPEC_VERBOSE"] = "1" if verbose else "0"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3",
                f"--log-dir={tmp_path / 'logs'}", "-m", "json.tool", "--help"]
    proc = subprocess.run([sys.executable, "-m", "recipec.compiler.supervisor", "--", *torchrun], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert ("Setting OMP_NUM_THREADS" in proc.stderr) is verbose, proc.stderr
    assert ("*****" in proc.stderr) is verbose, proc.stderr
    assert "[default0]:usage:" in proc.stdout + proc.stderr and "[default1]:usage:" in proc.stdout + proc.stderr


def test_the_banner_filter_keeps_every_other_line_in_order() -> None:
    from recipec.compiler.supervisor import BannerFilter

    stars = b"*" * 41 + b"\n"
    lines = [b"first\n", b"\n", stars, b"Setting OMP_NUM_THREADS environment variable for each process\n", stars,
             b"\n", b"W1129 12:00:00.000 1 run.py:1] \n", stars, b"another banner\n", stars, b"last\n", b"\n"]
    quiet, loud = BannerFilter(), BannerFilter(enabled=False)
    kept = [out for line in lines for out in quiet.feed(line)] + quiet.flush()
    assert kept == [b"first\n", b"\n", b"W1129 12:00:00.000 1 run.py:1] \n", stars, b"another banner\n", stars,
                    b"last\n", b"\n"]
    assert [out for line in lines for out in loud.feed(line)] + loud.flush() == lines
    long = [stars] + [b"line\n"] * 20  # stars that never close are not a banner: nothing is lost
    assert [out for line in long for out in quiet.feed(line)] + quiet.flush() == long


RANK_WARNINGS = textwrap.dedent('''
    import logging, sys, warnings
    from recipec.runtime import logs
    rank = int(sys.argv[1])
    logs.setup(rank)
    noise = [("full scope is deprecated. Use empty cuda_graph_scope", UserWarning, "megatron.core.transformer.x"),
             ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning, "megatron.x"),
             ("When using async grad allreduce it is recommended to set the environment variable "
              "CUDA_DEVICE_MAX_CONNECTIONS to 1", UserWarning, "megatron.core.tensor_parallel.layers"),
             ("Warning: tp_group is None, using default tp group.", DeprecationWarning, "megatron.core.utils"),
             ("torch.distributed is disabled, unavailable or uninitialized, assuming", UserWarning,
              "torch.distributed.checkpoint.state_dict_saver"),
             ("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning, "torch.distributed.c10d_logger")]
    for i, (message, category, module) in enumerate(noise):
        warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", i + 1, module=module)
    warnings.warn_explicit("a warning nobody filtered", UserWarning, "user.py", 1, module="user")
    logging.getLogger("recipec.runtime").info("progress")
    logging.getLogger("recipec.runtime").error("a real error")
    print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron")))
''')


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_side_filters(rank: int) -> None:
    """In a bare interpreter (no torch): noise is dropped, other warnings show on rank 0 only,
    progress is rank 0's, errors are everyone's, and RECIPEC_VERBOSE=1 shows it all."""
    def run(verbose: bool) -> tuple[str, str]:
        env = {**clean_env(), "RECIPEC_VERBOSE": "1" if verbose else ""}
        proc = subprocess.run([sys.executable, "-c", RANK_WARNINGS, str(rank)], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr

    out, err = run(verbose=False)
    assert "modules: []" in out  # logging setup imports no torch
    assert [n for n in NOISE_MESSAGES if n in err] == [], err
    assert ("a warning nobody filtered" in err) is (rank == 0), err
    assert ("progress" in out) is (rank == 0), out
    assert ("error: a real error" if rank == 0 else "rank 1: error: a real error") in out, out
    out, err = run(verbose=True)
    assert all(text in err for text in ("full scope is deprecated", "tp_group is None", "CUDA_DEVICE_MAX_CONNECTIONS",
                                        "a warning nobody filtered")), err
    assert "progress" in out and "a real error" in out


def test_the_progress_line_shows_tflops_only_where_a_peak_is_known() -> None:
    pytest.importorskip("torch")
    from recipec.runtime.metrics import progress_line

    stats = {"step_time_s": 0.25, "tokens_per_s": 8192.0, "tflops_per_gpu": 0.01, "mfu": 0.0, "mem_gib": 0.0}
    cpu = progress_line(5, 20, 4.2, 3e-4, 1.5, stats, 0, 0.0)
    assert cpu == "step  5/20 | loss 4.2000 | lr 3.000e-04 | grad norm 1.500 | 250 ms/step | 8,192 tok/s"
    gpu = progress_line(5, 20, 4.2, 3e-4, None, {**stats, "tflops_per_gpu": 400.0, "mfu": 0.404, "mem_gib": 12.5},
                        2, 989.0)
    assert gpu.endswith("grad norm n/a | skipped 2 | 250 ms/step | 8,192 tok/s | 400.0 TFLOP/s/GPU | MFU 40.4% | "
                        "mem 12.5 GiB"), gpu


def test_durations_and_sizes_read_as_a_person_says_them() -> None:
    from recipec.runtime.logs import seconds, size

    assert [seconds(s) for s in (0.042, 2.14, 185, 3725)] == ["0.04 s", "2.1 s", "3 min 05 s", "1 h 02 min"]
    assert [size(n) for n in (812, 3.4 * 2**20, 15.02 * 2**30)] == ["812 B", "3.4 MiB", "15.02 GiB"]


def test_progress_speaks_only_while_an_operation_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    from recipec.runtime.logs import Progress

    caplog.set_level("INFO", logger="recipec.runtime")
    Progress("packing corpus x", total=3, unit="documents", every_s=3600).update(1)
    assert caplog.messages == []  # a short operation says nothing until its one closing line
    Progress("packing corpus x", total=3, unit="documents", every_s=0).update(2)
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("packing corpus x: 2/3 documents, ")
