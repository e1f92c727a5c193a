"""README.md, run as a new user runs it (issue 14 item 7).

Every fenced block of README.md is a test case (its id names the line of its opening fence),
and so is every `recipec ...` command written inline in the prose or the table. The blocks are
read from README.md at test time, so an edited or added block is tested as written.

What runs, block by block:
- ```bash: each command (one per line, `\\` continues a line, `&&` chains) has a rule. Without
  an explicit rule in RULES, a compile-only command (`recipec build|explain|diff|list|schema`,
  `recipec launch ... --dry-run`) runs as written and must exit 0. Any other command without a
  rule fails this test: add a rule for it below.
- ```toml: a complete recipe (its `extends` resolve in the bundled library); it must build.
- ```python: runs as a script and must exit 0.
- any other language: fails until a rule for it is added.

Everything runs in a scratch directory laid out like the repository root (`examples/` linked
in), with the interpreter's bin/ (the venv: `recipec`, `python`) first on PATH. The commands
that cannot run here are listed in RULES with what is checked instead: `--dry-run` for
trainings (the main job itself runs in the test named in its rule), the CI script for the
set-up, a tiny config.json for import-hf. A rule that names a covering test also checks that
this test still runs the command (`covered_by`), so the reference cannot go stale silently.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
BIN = Path(sys.executable).parent
TIMEOUT = 120


# --- reading the README -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    start, lang, body = 0, "", []
    inside = False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if inside:
                blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            else:
                start, lang, body = number, line[3:].strip(), []
            inside = not inside
        elif inside:
            body.append(line)
    assert not inside, f"{path.name}:{start}: code block never closed"
    return blocks


@dataclass(frozen=True)
class Command:
    line: int  # 1-based README line
    text: str  # as written (comments kept): what bash runs

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def key(self) -> str:
        return " ".join(self.argv)


def shell_commands(block: Block) -> list[Command]:
    """One command per logical line (`\\` continues it); `a && b` is two commands."""
    out: list[Command] = []
    pending, first = "", 0
    for offset, line in enumerate(block.text.splitlines(), block.line + 1):
        if not pending:
            first = offset
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical, pending = (pending + line.lstrip()) if pending else line, ""
        if logical.strip() and not logical.lstrip().startswith("#"):
            out += [Command(first, part.strip()) for part in logical.split(" && ")]
    return out


def inline_commands(path: Path) -> list[Command]:
    """`recipec ...` written in running text or a table (outside fenced blocks)."""
    out: list[Command] = []
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            out += [Command(number, m.group(1)) for m in re.finditer(r"`(recipec [^`]+)`", line)]
    return out


# --- rules ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Covered:
    """`path::name` (a test function or class) runs this command for real; `needles` show it still does."""

    path: str
    name: str
    needles: tuple[str, ...]

    def check(self) -> None:
        source = (REPO / self.path).read_text()
        nodes = [n for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == self.name]
        assert nodes, f"covering test {self.path}::{self.name} is gone"
        body = ast.get_source_segment(source, nodes[0]) or ""
        missing = [n for n in self.needles if n not in body]
        assert not missing, f"{self.path}::{self.name} no longer runs the README command (lacks {missing})"


@dataclass(frozen=True)
class Rule:
    why: str
    run: str = "as written"  # "as written" | "dry run" (append --dry-run) | "ci step" | "not here"
    expect: str | None = None  # regex the output must contain
    covered_by: tuple[Covered, ...] = ()
    before: Callable[[Path], None] | None = None  # prepares the scratch directory
    after: Callable[[Path], None] | None = None  # further checks on what the command left


COMPILE_ONLY = Rule("compile-only: runs as written, exit 0")
DRY_LAUNCH = Rule("launch --dry-run compiles and prints; runs as written, exit 0")

MAIN_JOB = Covered("tests/launch/test_busy_port.py", "test_the_main_job_completes_with_its_port_held",
                   ('"launch", "llama3_tiny", "train.train_iters=2"', "returncode == 0"))
RELAUNCH = Covered("tests/launch/test_launch_local_e2e.py", "test_stopped_run_saves_and_the_relaunch_resumes",
                   ('"asking 2 rank(s) to save a checkpoint"', "_check_resumed"))
LR_CONTINUES = Covered("tests/runtime/test_old_state.py", "test_extending_a_finished_run_continues_its_lr_schedule",
                       ('"train.train_iters=20"',))
TP2_RUN = Covered("tests/runtime/test_train_e2e.py", "test_tensor_parallel_matches_single_rank",
                  ("reference: Run, tp2: Run",))
TP2_FIXTURE = Covered("tests/runtime/test_train_e2e.py", "tp2", ('"parallel.tensor_model_parallel_size=2"',))
TORCHRUN = Covered("tests/runtime/test_train_e2e.py", "Run",
                   ("torchrun_cmd(", '"-m", "recipec.runtime.train", "--artifact"'))  # launch_helpers: torch.distributed.run
HF_ROUND_TRIP = Covered("tests/hf/test_round_trip_readme.py",
                        "test_readme_commands_round_trip_an_fp32_model_with_its_tokenizer",
                        ('"convert", "hf-to-mcore", "./hf", "--recipe", "my_llama.toml", "-o", "ckpt/"',
                         '"convert", "mcore-to-hf", "ckpt/", "--recipe", "my_llama.toml", "-o", "./exported"'))


def _tiny_hf_dir(scratch: Path) -> None:
    """./Llama-3.2-1B as a user has it after a download, shrunk: its config.json (import-hf reads only that)."""
    (scratch / "Llama-3.2-1B").mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    (scratch / "Llama-3.2-1B" / "config.json").write_text(json.dumps(config))


def _imported_recipe_builds(scratch: Path) -> None:
    assert tomllib.loads((scratch / "my_llama.toml").read_text())["model"]["num_layers"] == 2
    built = recipec(scratch, "build", "my_llama.toml")
    assert built.returncode == 0, built.stderr


def _artifact_loads(scratch: Path) -> None:
    """The build directory the GPU command names exists (written by the block's commands above) and verifies."""
    from recipec.runtime.artifact import load_artifact

    assert load_artifact(scratch / "build" / "llama3_8b").config.name == "llama3_8b"


def _old_spelling_gets_a_hint(scratch: Path) -> None:
    old = recipec(scratch, "build", "llama3_8b", "model.tensor_model_parallel_size=4", "train.train_iters=100000")
    assert old.returncode == 2, old.stderr
    assert "write `parallel.tensor_model_parallel_size`" in old.stderr and "Traceback" not in old.stderr


CI_STEP = Rule("set-up or test command: .ci/run runs this exact step (it built the environment this test runs "
               "in; running the suite from inside itself would recurse)", run="ci step")

# Keyed by the command as shlex reads it (comments dropped). Anything not here and not compile-only fails.
RULES: dict[str, Rule] = {
    "python3 -m venv .venv": CI_STEP,
    ". .venv/bin/activate": CI_STEP,
    "pip install torch==2.13.0": CI_STEP,
    "pip install -e .[runtime,test]": CI_STEP,
    "python -m pytest -q": CI_STEP,
    "recipec launch llama3_tiny": Rule(
        "the main job (100 CPU steps, ~30 s): compiled here with --dry-run; the real launch, with "
        "train.train_iters=2, completes in tests/launch/test_busy_port.py", run="dry run",
        expect=r"--nproc-per-node=1 .*--artifact build/llama3_tiny", covered_by=(MAIN_JOB,)),
    "recipec launch llama3_tiny train.train_iters=200": Rule(
        "continues the main job's run: compiled here with --dry-run; a relaunch on the same run directory "
        "resumes in tests/launch/test_launch_local_e2e.py", run="dry run",
        expect=r"--artifact build/llama3_tiny", covered_by=(RELAUNCH, LR_CONTINUES)),
    ("recipec launch llama3_tiny launch.gpus_per_node=2 parallel.tensor_model_parallel_size=2 "
     "launch.output_dir=runs/tiny_tp2 checkpoint.save=runs/tiny_tp2/checkpoints"): Rule(
        "a 100-step two-process training: compiled here with --dry-run (its own run directory); TP=2 training "
        "on two processes runs in tests/runtime/test_train_e2e.py", run="dry run",
        expect=r"--nproc-per-node=2 .*--log-dir=runs/tiny_tp2/logs", covered_by=(TP2_FIXTURE, TP2_RUN)),
    "python -m torch.distributed.run --nproc-per-node 8 -m recipec.runtime.train --artifact build/llama3_8b": Rule(
        "8 GPU ranks of an 8B model: not run here; the build directory it names loads and verifies, and this "
        "torchrun form runs on CPU in tests/runtime/test_train_e2e.py (Run.command)", run="not here",
        covered_by=(TORCHRUN,), after=_artifact_loads),
    "recipec import-hf ./Llama-3.2-1B -o my_llama.toml": Rule(
        "runs as written against a ./Llama-3.2-1B this test writes (a tiny config.json); the recipe builds",
        before=_tiny_hf_dir, after=_imported_recipe_builds),
    "recipec convert hf-to-mcore ./Llama-3.2-1B --recipe my_llama.toml -o ckpt/": Rule(
        "needs weights and torch: these arguments run on a tiny model in tests/hf/test_round_trip_readme.py",
        run="not here", covered_by=(HF_ROUND_TRIP,)),
    "recipec convert mcore-to-hf ckpt/ --recipe my_llama.toml -o ./exported": Rule(
        "needs the checkpoint above: these arguments run in tests/hf/test_round_trip_readme.py (bit-exact back)",
        run="not here", covered_by=(HF_ROUND_TRIP,)),
    "recipec build llama3_8b parallel.tensor_model_parallel_size=4 train.train_iters=100000": Rule(
        "compile-only, exit 0; and the table's claim: the old spelling model.tensor_model_parallel_size gets "
        "a hint naming parallel.tensor_model_parallel_size", after=_old_spelling_gets_a_hint),
}

# What a Python block must print, by a line it contains.
PYTHON_OUTPUT = {
    "small.config.model.kv_channels": r"^\d+ 48\n$",  # 768 hidden / 16 heads: re-derived, not the 8B's 128
}


def rule_for(cmd: Command) -> Rule:
    if cmd.key in RULES:
        return RULES[cmd.key]
    argv = cmd.argv
    if argv[:1] == ["recipec"] and argv[1:2] in (["build"], ["explain"], ["diff"], ["list"], ["schema"]):
        return COMPILE_ONLY
    if argv[:2] == ["recipec", "launch"] and "--dry-run" in argv:
        return DRY_LAUNCH
    pytest.fail(f"README.md:{cmd.line}: no rule for `{cmd.text}`; add one to RULES in {Path(__file__).name} "
                "(run it here, with --dry-run, or name the test that runs it)")


# --- running ---------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RECIPEC_UPDATE_GOLDEN"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def recipec(scratch: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "recipec"), *args], cwd=scratch, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def bash(scratch: Path, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", text], cwd=scratch, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A directory that looks like the repository root to the README's commands; build/ and runs/ land here."""
    assert (BIN / "recipec").is_file(), f"no `recipec` next to {sys.executable}: pip install -e '.[runtime,test]'"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


def _ci_steps() -> set[str]:
    """.ci/run's commands as a user types them: `python -m pip install -q X` is `pip install X`."""
    steps = set()
    for line in CI_SCRIPT.read_text().splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:3] == ["python", "-m", "pip"]:
            argv = [a for a in argv[2:] if a != "-q"]
        steps.add(" ".join(argv))
    return steps


def run_command(cmd: Command, scratch: Path) -> None:
    rule = rule_for(cmd)
    where = f"README.md:{cmd.line}: `{cmd.text}` ({rule.why})"
    print(where)  # which rule each command ran under: pytest -rP shows it
    for covered in rule.covered_by:
        covered.check()
    if rule.before:
        rule.before(scratch)
    if rule.run == "ci step":
        assert cmd.key in _ci_steps(), f"{where}: .ci/run does not run this step"
    elif rule.run in ("as written", "dry run"):
        text = cmd.text if rule.run == "as written" else shlex.join([*cmd.argv, "--dry-run"])
        proc = bash(scratch, text)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{output[-3000:]}"
        assert "Traceback" not in output, f"{where}\n{output[-3000:]}"
        if rule.expect:
            assert re.search(rule.expect, output), f"{where}: output lacks /{rule.expect}/\n{output[-3000:]}"
    else:
        assert rule.run == "not here", rule.run
    if rule.after:
        rule.after(scratch)


# --- the tests -------------------------------------------------------------------------------------------

BLOCKS = fenced_blocks(README)
INLINE = inline_commands(README)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}-{b.lang or 'text'}" for b in BLOCKS])
def test_readme_block(block: Block, scratch: Path) -> None:
    if block.lang in ("bash", "sh", "shell", "console"):
        commands = shell_commands(block)
        assert commands, f"README.md:{block.line}: a shell block without commands"
        for cmd in commands:  # in order, in one directory: later commands may use what earlier ones wrote
            run_command(cmd, scratch)
    elif block.lang == "toml":
        (scratch / "readme_recipe.toml").write_text(block.text)
        built = recipec(scratch, "build", "readme_recipe.toml")
        assert built.returncode == 0, f"README.md:{block.line}: the recipe does not build:\n{built.stderr}"
    elif block.lang == "python":
        (scratch / "readme_block.py").write_text(block.text)
        proc = subprocess.run([sys.executable, "readme_block.py"], cwd=scratch, env=_env(), capture_output=True,
                              text=True, timeout=TIMEOUT, check=False)
        assert proc.returncode == 0, f"README.md:{block.line}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        for marker, pattern in PYTHON_OUTPUT.items():
            if marker in block.text:
                assert re.search(pattern, proc.stdout), f"README.md:{block.line}: printed {proc.stdout!r}"
    else:
        pytest.fail(f"README.md:{block.line}: no rule for ```{block.lang} blocks; add one to {Path(__file__).name}")


@pytest.mark.parametrize("cmd", INLINE, ids=[f"README.md:{c.line}-{c.argv[1]}" for c in INLINE])
def test_readme_inline_command(cmd: Command, scratch: Path) -> None:
    if len(cmd.argv) == 2:  # `recipec build` in a sentence names the subcommand
        from recipec.compiler.cli import main

        assert cmd.argv[1] in main.commands, f"README.md:{cmd.line}: no subcommand `{cmd.text}`"
        return
    run_command(cmd, scratch)


def test_every_rule_is_used() -> None:
    """A rule whose command left the README is stale: drop it with the command."""
    written = {c.key for b in BLOCKS if b.lang == "bash" for c in shell_commands(b)} | {c.key for c in INLINE}
    assert not set(RULES) - written, sorted(set(RULES) - written)


def test_files_the_readme_names_exist_from_the_repo_root() -> None:
    text = README.read_text()
    named = set(re.findall(r"(?<![\w/])((?:examples|bench|tests|runtime|compiler|recipes_toml|\.ci)/[\w./-]*\w)",
                           text))
    for cmd in [c for b in BLOCKS if b.lang == "bash" for c in shell_commands(b)] + INLINE:
        argv = cmd.argv
        named |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-f", "--file")}
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"README.md names files that do not exist under the repository root: {missing}"
    assert {"examples/small_llama3.toml", "examples/overrides.toml"} <= named


def test_recipe_library_readme_extends_lines_are_the_recipes() -> None:
    """recipes_toml/README.md shows recipes by their `extends` line, with the recipe's name as the comment."""
    (block,) = [b for b in fenced_blocks(REPO / "recipes_toml" / "README.md") if b.lang == "toml"]
    for line in block.text.splitlines():
        name = line.partition("#")[2].strip()
        shown = tomllib.loads(line.partition("#")[0])["extends"]
        actual = tomllib.loads((REPO / "recipes_toml" / f"{name}.toml").read_text())["extends"]
        assert shown == actual, f"recipes_toml/README.md: {name} extends {actual}, not {shown}"
