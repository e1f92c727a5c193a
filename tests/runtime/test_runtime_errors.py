"""The runtime's exit-2 boundary (issue 11): anything a user or a file causes in
`python -m recipec.runtime.train` is one `recipec: error:` message and exit 2, never a
traceback (a plan.json that is not one, a run started without torchrun, data files that are
empty, binary, too small for data.split, SFT lines nested 100k deep); a bug keeps its traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from recipec.compiler import build
from recipec.compiler.errors import ArtifactError, RecipeError
from recipec.compiler.render import fingerprint
from recipec.runtime.artifact import load_artifact
from recipec.runtime.boundary import guarded, missing_launcher_env, user_message

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import free_tcp_port  # noqa: E402

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _env(one_rank: bool) -> dict[str, str]:
    """A rank's environment (as torchrun sets it for one process), or none of torchrun's variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if one_rank:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_tcp_port()))
    return env


def run_entry(artifact: Path | str, cwd: Path, one_rank: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(artifact)],
                          check=False, capture_output=True, text=True, timeout=240, cwd=cwd,
                          env=_env(one_rank))


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, one `recipec: error:` message that contains every needle, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert proc.stderr.count("recipec: error: ") == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-3000:]}"
    return proc.stderr


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("llama3_tiny").write(tmp_path_factory.mktemp("plan") / "build")


def _rewrite_plan(artifact: Path, target: Path, edit) -> Path:
    """A copy of the artifact with `edit(data)` applied and its fingerprint made to match (as a
    determined editor would), so only the runtime's own checks stand between it and a run."""
    data = json.loads((artifact / "plan.json").read_text())
    edit(data)
    data["fingerprint"] = fingerprint(data["config"], data["plan"])
    target.mkdir(parents=True, exist_ok=True)
    (target / "plan.json").write_text(json.dumps(data))
    return target


# ---------------------------------------------------------------- plan.json
BAD_PLANS = {
    "not-utf8": (b"\xff\xfe{\"artifact_version\": 1}", "is not UTF-8 text (invalid start byte at byte 0)"),
    "a-list": (b"[1, 2, 3]", "holds a JSON list, not the object"),
    "nan": (b'{"artifact_version": 1, "plan": {"x": NaN}}', "NaN is not a value `recipec build` writes"),
    "infinity": (b'{"artifact_version": 1, "plan": {"x": -Infinity}}', "-Infinity is not a value"),
    "100k-deep": (b"[" * 100_000 + b"]" * 100_000, "nests JSON deeper than Python can read"),
    "deep-inside": (b'{"config": ' + b"[" * 40 + b"]" * 40 + b"}", "nests JSON more than 32 levels deep"),
    "not-json": (b'{"artifact_version": 1,', "plan.json:1: not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_plan_json_that_is_no_artifact_is_an_artifact_error(tmp_path: Path, name: str) -> None:
    content, message = BAD_PLANS[name]
    (tmp_path / "plan.json").write_bytes(content)
    with pytest.raises(ArtifactError) as info:
        load_artifact(tmp_path)
    assert message in str(info.value) and str(tmp_path / "plan.json") in str(info.value)
    assert "rebuild it with `recipec build`" in str(info.value)


@pytest.mark.parametrize("key, value", [("padded_vocab_size", "abc"), ("microbatches_per_step", 0),
                                        ("world_size", True), ("peak_tflops", None)])
def test_plan_fields_of_the_wrong_type_are_refused_even_with_a_matching_fingerprint(
        tmp_path: Path, artifact: Path, key: str, value: object) -> None:
    directory = _rewrite_plan(artifact, tmp_path / "b", lambda d: d["plan"].__setitem__(key, value))
    with pytest.raises(ArtifactError, match=rf"plan\.{key} = {value!r} is not what `recipec build` writes"):
        load_artifact(directory)


def test_the_entry_turns_every_bad_plan_into_exit_2(tmp_path: Path) -> None:
    """Through the entry's main() (what `python -m recipec.runtime.train` runs): one message, exit 2.
    One interpreter runs them all; the tests below start the module itself."""
    names = sorted(BAD_PLANS)
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "plan.json").write_bytes(BAD_PLANS[name][0])
    script = ("import sys\nfrom recipec.runtime.train import main\nfor p in sys.argv[1:]:\n"
              "    code = main(['--artifact', p])\n    print(f'=== {code}', file=sys.stderr, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / n) for n in names)], check=False,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=_env(True))
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    parts = proc.stderr.split("=== ")
    for name, part, after in zip(names, parts, parts[1:]):
        assert after.startswith("2\n"), (name, part, after[:20])
        assert part.count("recipec: error: ") == 1 and BAD_PLANS[name][1] in part, (name, part)


def test_started_without_torchrun_says_how_to_launch(tmp_path: Path, artifact: Path) -> None:
    """Was: ValueError "environment variable RANK expected, but not set" with a traceback."""
    err = assert_user_error(run_entry(artifact, tmp_path, one_rank=False), "not started by torchrun",
                            "recipec launch RECIPE", "torchrun --nproc-per-node=N -m recipec.runtime.train")
    assert "RANK" in err


# ---------------------------------------------------------------- text data
def _text_run(tmp_path: Path, content: bytes, *overrides: str) -> subprocess.CompletedProcess[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    directory = build("llama3_tiny", ["data.kind=text", f'data.paths=["{corpus}"]', "tokenizer.type=byte",
                                      f"launch.output_dir={tmp_path / 'out'}", "train.train_iters=1",
                                      *overrides]).write(tmp_path / "b")
    return run_entry(directory, tmp_path)


@pytest.mark.parametrize("content, needles", [
    (b"", ["corpus.txt: no text to train on (0 bytes, all blank)", "[data.paths]"]),
    (b"some text\n" + bytes(range(128, 256)) * 8, ["corpus.txt: line 2: not UTF-8 text", 'data.kind = "indexed"']),
    (b"one short document", ["corpus.txt has 1 sequence(s), and data.split='95,5,0' leaves the valid split none",
                             "[data.split]"]),
], ids=["empty", "binary", "too-small-for-the-split"])
@pytest.mark.timeout(300)
def test_text_data_that_cannot_train_is_exit_2(tmp_path: Path, content: bytes, needles: list[str]) -> None:
    """Empty: was an AttributeError deep in Megatron; binary: a UnicodeDecodeError; a corpus with
    fewer documents than data.split needs: an endless loop in GPTDataset._get_num_epochs."""
    assert_user_error(_text_run(tmp_path, content), *needles)


# ---------------------------------------------------------------- sft data
def test_sft_line_nested_100k_deep_names_file_and_line(tmp_path: Path) -> None:
    from recipec.runtime.sft import SFTDataError, tokenize_file
    from recipec.runtime.tokenizer import ByteTokenizer

    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000
                    + ', "response": "b"}\n')
    with pytest.raises(SFTDataError, match=r"deep\.jsonl:2: JSON nested deeper than Python can read"):
        tokenize_file(str(path), ByteTokenizer(), 32)


def test_sft_chat_template_that_raises_names_file_and_line(tmp_path: Path) -> None:
    """A template's own `raise_exception` (roles must alternate, ...) is the data's problem, not a crash."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from recipec.runtime.sft import SFTDataError, tokenize_file
    from recipec.runtime.tokenizer import HFTokenizer

    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")
    fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                          "{{ raise_exception('system messages are not supported') }}{% endif %}"
                          "[{{ m['role'] }}]{{ m['content'] }}<|eot|>{% endfor %}")
    fast.save_pretrained(tmp_path / "tok")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "x"},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(SFTDataError, match=r"chat\.jsonl:1: the tokenizer's chat template refused this "
                                           r"conversation \(.*system messages are not supported"):
        tokenize_file(str(path), HFTokenizer(str(tmp_path / "tok")), 64)


# ---------------------------------------------------------------- the boundary itself
def test_file_caused_os_errors_become_messages_and_bugs_keep_their_traceback(capsys) -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/ckpt/iter_0000010/__0_0.distcp")
    assert user_message(full) == ("disk full at /runs/x/ckpt/iter_0000010/__0_0.distcp (No space left on device)\n"
                                  "   hint: free space on that file system, or point the run at another one")
    assert "permission denied at /root/out" in user_message(PermissionError(errno.EACCES, "x", "/root/out"))
    assert user_message(RecipeError("[train.lr] bad")) == "[train.lr] bad"
    # Not the user's doing: a broken pipe to a worker, a KeyError, a RecursionError in our code.
    for bug in (BrokenPipeError(errno.EPIPE, "Broken pipe"), KeyError("x"), RecursionError(), ValueError("x")):
        assert user_message(bug) is None

    def full_disk() -> int:
        raise full

    assert guarded(full_disk) == 2
    assert capsys.readouterr().err.startswith("recipec: error: disk full at /runs/x/ckpt/")

    def bug() -> int:
        raise KeyError("a bug in recipec")

    with pytest.raises(KeyError):
        guarded(bug)


def test_missing_launcher_env_lists_what_torchrun_would_have_set() -> None:
    assert missing_launcher_env({}) == ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
    assert missing_launcher_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                 "MASTER_PORT": "1"}) == []
