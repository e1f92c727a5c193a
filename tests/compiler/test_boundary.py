"""The CLI's exit-2 boundary (issue 11): every failure a user or a file can cause is one
`recipec: error:` message and exit 2 (extends chains, long names, odd files, the build
directory, deep or huge values, absurd numbers); a bug in recipec still shows its traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from compiler_testlib import DATA, write
from recipec.compiler import RecipeError, build
from recipec.compiler.cli import main
from recipec.compiler.errors import ExtendsLimitError
from recipec.compiler.loader import MAX_EXTENDS_DEPTH, MAX_LOADS

BASE = f"extends = {json.dumps((DATA / 'dense.toml').as_posix())}\n"
SECRET = "root:x:0:0:secret-first-line"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def user_error(result: Result, *patterns: str) -> str:
    """Exit 2, one `recipec: error:` message, no traceback; the message matches every pattern."""
    assert result.exit_code == 2, (result.exit_code, result.exception, result.output)
    assert "Traceback" not in result.output
    assert result.output.startswith("recipec: error: "), result.output
    for pattern in patterns:
        assert re.search(pattern, result.output), f"{pattern!r} not in:\n{result.output}"
    return result.output


def test_extends_chain_deeper_than_the_limit_shows_its_start_and_end(in_tmp: Path) -> None:
    n = 1000  # ~970 used to overflow Python's stack
    for i in range(n):
        write(in_tmp / f"c{i}.toml", f'extends = "c{i + 1}"\n' if i < n - 1 else BASE)
    out = user_error(run("build", "c0.toml"), rf"more than {MAX_EXTENDS_DEPTH} files deep",
                     r"c0\.toml -> c1\.toml -> c2\.toml -> \.\.\. \(\d+ more\) -> .* -> c64\.toml", r"hint: ")
    assert len(out) < 1000
    # A chain within the limit compiles.
    write(in_tmp / f"c{MAX_EXTENDS_DEPTH - 2}.toml", BASE)
    assert build("c0.toml").config.model.num_layers


def test_extends_fan_out_is_bounded(in_tmp: Path) -> None:
    """A diamond lattice reaches 2**20 files: an error after MAX_LOADS, not a hang."""
    for i in range(20):
        write(in_tmp / f"d{i}.toml", f'extends = ["d{i + 1}", "d{i + 1}"]\n')
    write(in_tmp / "d20.toml", BASE)
    with pytest.raises(ExtendsLimitError, match=rf"more than {MAX_LOADS} files"):
        build("d0.toml")


@pytest.mark.parametrize("ref", ["secret", "secret.txt"])
def test_extends_names_only_toml_files_and_never_echoes_another_file(in_tmp: Path, ref: str) -> None:
    write(in_tmp / ref, SECRET + "\n")
    write(in_tmp / "r.toml", f'extends = "{ref}"\n')
    out = user_error(run("build", "r.toml"), rf"{re.escape(ref)} is not a recipe: recipes are \.toml files")
    assert "secret-first-line" not in out
    out = user_error(run("build", ref), r"is not a recipe")  # the recipe argument too
    assert "secret-first-line" not in out


def test_extends_an_absolute_non_recipe_file(in_tmp: Path) -> None:
    target = write(in_tmp / "elsewhere" / "passwd", SECRET + "\n")
    write(in_tmp / "r.toml", f"extends = {json.dumps(str(target))}\n")
    assert "secret-first-line" not in user_error(run("build", "r.toml"), "is not a recipe")


def test_a_toml_link_to_another_file_is_refused_unread(in_tmp: Path) -> None:
    target = write(in_tmp / "passwd", SECRET + "\n")
    (in_tmp / "evil.toml").symlink_to(target)
    write(in_tmp / "r.toml", 'extends = "evil"\n')
    out = user_error(run("build", "r.toml"), r"evil\.toml links to .*passwd, which is not a \.toml file")
    assert "secret-first-line" not in out


def test_out_pointing_at_a_file(in_tmp: Path) -> None:
    write(in_tmp / "file", "x")
    user_error(run("build", str(DATA / "small.toml"), "-o", "file"), r"-o file is a file, not a directory")
    user_error(run("build", str(DATA / "small.toml"), "-o", "file/sub"), r"file/sub")
    assert (in_tmp / "file").read_text() == "x"


@pytest.mark.parametrize("args", [
    ["build", "a" * 100_000],
    ["build", "b" * 300 + ".toml"],
    ["build", str(DATA / "small.toml"), "-f", "c" * 100_000],
    ["build", str(DATA / "small.toml"), "-o", "d" * 300],
    ["build", str(DATA / "small.toml"), "name=" + "e" * 100_000],
    ["build", str(DATA / "small.toml"), "description=" + json.dumps("f" * 100_000)],
    ["build", str(DATA / "small.toml"), "+launch.env." + "G" * 100_000 + "=1"],
    ["build", str(DATA / "small.toml"), "train.train_iters=" + "1" * 100_000],
    ["build", str(DATA / "small.toml"), "~" + "h." * 50_000 + "h"],
    ["build", str(DATA / "small.toml"), "+launch.env." + "A." * 3000 + "B=1"],
    ["explain", str(DATA / "small.toml"), "i" * 100_000],
    ["import-hf", "j" * 100_000],
], ids=["recipe", "recipe-component", "overlay", "out", "name", "description", "env-key", "digits", "unset-deep",
        "key-deep", "explain-key", "import-hf"])
def test_100k_character_inputs(in_tmp: Path, args: list[str]) -> None:
    result = run(*args)
    if result.exit_code == 0:  # a long description, or env name, is fine; it compiles
        assert args[2].startswith(("description=", "+launch.env.G"))
        return
    out = user_error(result)
    assert len(out) < 5000, "user text is clipped in messages"


def test_non_utf8_recipe_and_arguments(in_tmp: Path) -> None:
    write(in_tmp / "r.toml", BASE.encode() + b'name = "\xff"\n')
    user_error(run("build", "r.toml"), r"r\.toml:2: \[name\] not UTF-8 text")
    user_error(run("build", "\udcff"), r"recipe '\\udcff' not found")  # argv bytes that are not UTF-8
    user_error(run("build", str(DATA / "small.toml"), "name=\udcff"), r"is not a TOML value")


def test_unreadable_recipe_is_a_user_error(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(in_tmp / "r.toml", BASE)
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("r.toml"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    user_error(run("build", "r.toml"), r"cannot read r\.toml: Permission denied")


def _without_root_powers() -> list[str] | None:
    """A command prefix under which permissions apply (root drops its override capabilities)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"] if setpriv else None


def test_permission_denied_for_real(tmp_path: Path) -> None:
    prefix = _without_root_powers()
    if prefix is None:
        pytest.skip("root without setpriv reads any file")
    write(tmp_path / "r.toml", BASE).chmod(0)
    write(tmp_path / "closed" / "r.toml", BASE)
    (tmp_path / "closed").chmod(0)
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        for args, pattern in [(["r.toml"], r"cannot read r\.toml: Permission denied"),
                              (["closed/r.toml"], r"cannot look up .*closed/r\.toml: Permission denied"),
                              ([str(DATA / "small.toml"), "-o", "ro/out"], r"ro/out.*Permission denied")]:
            done = subprocess.run([*prefix, sys.executable, "-m", "recipec.compiler.cli", "build", *args],
                                  cwd=tmp_path, capture_output=True, text=True, check=False)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert re.search(pattern, done.stderr), done.stderr
    finally:
        (tmp_path / "closed").chmod(0o755)


@pytest.mark.parametrize("text, pattern", [
    ("x = " + "[" * 100_000 + "]" * 100_000, r"r\.toml:1: \[x\] invalid TOML: arrays or inline tables nested deeper"),
    ("x = " + "{a=" * 50_000 + "1" + "}" * 50_000, r"nested deeper than 32"),
    ("[" + ".".join(["a"] * 100_000) + "]", r"r\.toml:1: .*nested deeper than 32 levels"),
    ("a" + ".a" * 5000 + " = 1", r"nested deeper than 32 levels"),
    ("x = 1\ny = " + "1" * 5000, r"r\.toml:2: \[y\] invalid TOML: an integer with more than \d+ digits"),
    ("[model]\nnum_layers = 9223372036854775807", r"\[model\.num_layers\] must be <= 10000, got 9223372036854775807"),
], ids=["deep-array", "deep-inline-table", "deep-header", "deep-dotted-key", "long-int", "layers-int64"])
def test_hostile_toml_is_a_user_error(in_tmp: Path, text: str, pattern: str) -> None:
    write(in_tmp / "r.toml", text + "\n")
    assert len(user_error(run("build", "r.toml"), pattern)) < 5000


def test_an_override_is_one_value_and_cannot_smuggle_keys(in_tmp: Path) -> None:
    smuggled = 'description="a" #\n[launch.env]\nLD_PRELOAD = "/x.so"'
    user_error(run("build", str(DATA / "small.toml"), smuggled), r"more than one value")


@pytest.mark.parametrize("override, pattern", [
    ("optimizer.lr=1e308", r"\[optimizer\.lr\] must be <= 10\.0, got 1e\+308"),
    ("model.num_layers=9223372036854775807", r"\[model\.num_layers\] must be <= 10000, got 9223372036854775807"),
    ("model.hidden_size=4294967296", r"\[model\.hidden_size\] must be <= 1048576"),
    ("train.train_iters=10000000000000", r"\[train\.train_iters\] must be <= 1000000000000"),
    ("train.global_batch_size=4294967296", r"\[train\.global_batch_size\] must be <= 1073741824"),
    ("model.seq_length=1000000000", r"\[model\.seq_length\] must be <= 134217728"),
    ("model.vocab_size=100000000", r"\[model\.vocab_size\] must be <= 16777216"),
    ("train.seed=4294967296", r"\[train\.seed\] must be <= 2147483647"),
])
def test_absurd_numbers_fail_with_the_limit(in_tmp: Path, override: str, pattern: str) -> None:
    user_error(run("build", str(DATA / "small.toml"), override), pattern, r"hint: the limit .* is far above any real")


def test_a_bug_still_shows_its_traceback(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only RecipeError and file-caused exceptions are turned into exit 2."""
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("recipec.compiler.cli.build", broken)
    result = run("build", str(DATA / "small.toml"))
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_file_errors_no_check_foresaw_are_exit_2(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "build/small/plan.json")

    monkeypatch.setattr("recipec.compiler.cli.build", disk_full)
    user_error(run("build", str(DATA / "small.toml")), r"build/small/plan\.json: No space left on device",
               r"hint: free some space")


def test_errors_are_reported_together_but_printed_bounded(in_tmp: Path) -> None:
    write(in_tmp / "r.toml", BASE + "[model]\n" + "".join(f"k{i} = {i}\n" for i in range(5000)))
    with pytest.raises(RecipeError) as info:
        build("r.toml")
    assert len(info.value.problems) == 5000
    message = str(info.value)
    assert message.endswith("... and 4950 more") and message.count("\n") < 200
