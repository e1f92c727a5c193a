"""`recipec convert` on files a user was handed (issue 11): a wrong q_proj shape, a damaged
safetensors header, a truncated shard, an index that points outside the model directory or at a
missing shard, integer "weights", and checkpoints whose pickles would run code. Each is one
`recipec: error:` naming the file and exit 2: no traceback, nothing read outside the directory,
no payload run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfutil
from recipec.compiler.errors import RecipeError

RECIPEC = [sys.executable, "-c", "from recipec.compiler.cli import main; main()"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hfutil.make_hf_model("llama2", tmp_path_factory.mktemp("hf") / "llama2")


def _variant(model: Path, tmp_path: Path, edit) -> Path:
    """A copy of the HF directory with `edit(directory, tensors)` applied."""
    from safetensors.torch import load_file

    directory = tmp_path / "hf"
    shutil.copytree(model, directory)
    edit(directory, load_file(str(model / "model.safetensors")))
    return directory


def _save(directory: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _wrong_q(d: Path, t: dict) -> None:
    _save(d, {**t, "model.layers.0.self_attn.q_proj.weight": torch.zeros(10, 64)})


def _header(d: Path, t: dict) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (d / "model.safetensors").write_bytes(bytes(data))


def _header_size(d: Path, t: dict) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(bytes(data))


def _truncated(d: Path, t: dict) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _index(weight_map: object) -> object:
    def edit(d: Path, t: dict) -> None:
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": weight_map(t) if callable(weight_map) else weight_map}))
    return edit


def _int_weights(d: Path, t: dict) -> None:
    _save(d, {**t, "model.norm.weight": torch.ones(64, dtype=torch.int64)})


CASES = {
    "wrong-q_proj-shape": (_wrong_q, (r"model\.layers\.0\.self_attn\.q_proj\.weight \(10, 64\).* do not fit "
                                      r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight.*expected \(64, 64\)")),
    "corrupt-header": (_header, r"model\.safetensors is not a readable safetensors file \(.*header"),
    "header-too-large": (_header_size, r"model\.safetensors is not a readable safetensors file \(.*too large"),
    "truncated": (_truncated, r"model\.safetensors is not a readable safetensors file"),
    "index-outside": (_index(lambda t: dict.fromkeys(t, "../outside.safetensors")),
                      r"weight_map\[.*\] = '\.\./outside\.safetensors' is not a shard file inside .*refusing"),
    "index-absolute": (_index(lambda t: dict.fromkeys(t, "/etc/passwd")), r"= '/etc/passwd' is not a shard file"),
    "index-missing-shard": (_index(lambda t: dict.fromkeys(t, "model-00002-of-00002.safetensors")),
                            r"model-00002-of-00002\.safetensors does not exist, but model\.safetensors\.index"),
    "index-a-list": (lambda d, t: (d / "model.safetensors.index.json").write_text("[1]"),
                     r"expected an object with \"weight_map\""),
    "index-not-json": (lambda d, t: (d / "model.safetensors.index.json").write_bytes(b"\xff{"),
                       r"index\.json is not UTF-8 text"),
    "integer-weights": (_int_weights, r"tensor 'model\.norm\.weight' has dtype torch\.int64"),
    "missing-tensor": (lambda d, t: _save(d, {k: v for k, v in t.items() if k != "model.norm.weight"}),
                       r"tensor 'model\.norm\.weight' is missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_hf_directory_is_a_recipe_error_naming_the_file(tmp_path: Path, model: Path, case: str) -> None:
    from recipec.runtime.hf.convert import hf_to_mcore

    edit, pattern = CASES[case]
    directory = _variant(model, tmp_path, edit)
    with pytest.raises(RecipeError, match=pattern) as info:
        hf_to_mcore(directory, tmp_path / "ck")
    assert str(directory) in str(info.value)
    assert not (tmp_path / "ck" / "iter_0000000").exists()


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RECIPEC, "convert", *args], env={**hfutil.clean_env(), **env}, check=False,
                          capture_output=True, text=True, timeout=300)


def _assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("recipec: error: ") or "\nrecipec: error: " in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_the_cli_refuses_an_index_that_points_outside_the_directory(tmp_path: Path, model: Path) -> None:
    """Was: `recipec convert hf-to-mcore` read the weights from ../outside.safetensors and succeeded."""
    from safetensors.torch import load_file, save_file

    outside = tmp_path / "outside.safetensors"
    save_file({k: torch.full_like(v, 7.0) for k, v in load_file(str(model / "model.safetensors")).items()},
              str(outside))
    directory = _variant(model, tmp_path, _index(lambda t: dict.fromkeys(t, "../outside.safetensors")))
    proc = _cli("hf-to-mcore", str(directory), "-o", str(tmp_path / "ck"))
    _assert_user_error(proc, "'../outside.safetensors' is not a shard file inside", "refusing to read outside it")
    assert not (tmp_path / "ck" / "iter_0000000").exists()


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.timeout(600)
def test_mcore_to_hf_never_runs_a_checkpoints_pickle(tmp_path: Path, model: Path) -> None:
    """With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set (as a recipe's launch.env or a shell could), a
    crafted common.pt or .metadata is refused: exit 2, and the payload never runs."""
    recipe = hfutil.write_recipe(model, tmp_path / "l.toml")
    good = tmp_path / "ck"
    proc = _cli("hf-to-mcore", str(model), "-o", str(good))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for file in ("common.pt", ".metadata"):
        ckpt = tmp_path / f"ck_{file.strip('.')}"
        shutil.copytree(good, ckpt)
        step = ckpt / "iter_0000000"
        sentinel = tmp_path / f"SENTINEL_{file.strip('.')}"
        if file == "common.pt":
            state = torch.load(step / file, weights_only=True)
            torch.save({**state, "payload": Payload(sentinel)}, step / file)
        else:
            (step / file).write_bytes(pickle.dumps(Payload(sentinel)))
        proc = _cli("mcore-to-hf", str(ckpt), "--recipe", str(recipe), "-o", str(tmp_path / f"out_{file}"),
                    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        _assert_user_error(proc, f"{step} cannot be read as a dist checkpoint", "refers to posix.system")
        assert not sentinel.exists(), f"the pickle in {file} ran"
