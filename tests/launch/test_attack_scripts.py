"""Payloads in every string a recipe carries: either a RecipeError, or scripts that run nothing of them.

For every string field of the schema (found by walking the attrs classes, so a new field is
attacked without editing this file), every `[launch.env]` key and value, and the build
directory (-o), a payload goes in through an overlay file. Then either `build` raises
RecipeError, or the generated launch.sh and job.sbatch are run by bash with recording stubs
for torchrun/python/srun/scontrol/sbatch on PATH (script_stubs.py), and

- no payload ran: the sentinel files its `touch` would create do not exist;
- each stub saw exactly the argv the renderer meant (the payload arrives verbatim inside
  one argument) and every rank-bound environment variable with exactly its value.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from recipec.compiler import RecipeError, build
from recipec.compiler.executors.node import environment, node_argv, supervised
from recipec.compiler.executors.slurm import _TASK_PREFIX, task_argv
from recipec.compiler.schema import RecipeConfig
from recipec.compiler.shell import join
from recipec.compiler.structure import section_classes
from script_stubs import HEAD, StubBin, expand, job_env

RECIPE = "llama3_tiny"
ENV_X = "X"  # set in every overlay, so that `${X@P}` somewhere else would run it if it were expanded


def _has_str(tp: object) -> bool:
    return tp is str or any(_has_str(a) for a in typing.get_args(tp))


def string_fields() -> list[tuple[str, ...]]:
    """Every schema key whose value is or holds strings: ("launch", "output_dir"), ("name",), ..."""
    paths = [(f.name,) for f in attrs.fields(RecipeConfig) if not f.metadata.get("section") and _has_str(f.type)]
    for section, cls in section_classes().items():
        paths += [(section, f.name) for f in attrs.fields(cls) if _has_str(f.type)]
    return paths


def _field_type(path: tuple[str, ...]) -> object:
    cls = RecipeConfig if len(path) == 1 else section_classes()[path[0]]
    return attrs.fields_dict(cls)[path[-1]].type


def toml_str(text: str) -> str:
    """A TOML basic string for any text (control characters as \\uXXXX)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def payloads(sentinel: Path) -> list[str]:
    s = sentinel
    return [
        f"$(touch {s}/dollar-paren)",
        f"`touch {s}/backtick`",
        "/runs/${X@P}",
        f"a;touch {s}/semicolon;b",
        f"'; touch {s}/single-quote; '",
        f'"; touch {s}/double-quote; "',
        f"a\ntouch {s}/newline\n",
        f"a\rtouch {s}/cr",
        "a\x00b",
        "%j-%x-%%-{name}-{}",
        f"$'\\x41'|touch {s}/pipe&",
        f"--x=$(touch {s}/opt) #",
    ]


class Attack:
    """One attempt: a workspace, an overlay with the payloads, a build, and the scripts run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sentinel = root / "sentinel"
        self.sentinel.mkdir(parents=True, exist_ok=True)
        self.stubs = StubBin(root / "bin")

    def overlay(self, values: dict[tuple[str, ...], object], env: dict[str, str]) -> Path:
        tables: dict[str, list[str]] = {}
        top: list[str] = []
        for path, value in values.items():
            if isinstance(value, list):
                text = "[" + ", ".join(toml_str(v) for v in value) + "]"
            else:
                text = toml_str(str(value))
            (top if len(path) == 1 else tables.setdefault(path[0], [])).append(f"{path[-1]} = {text}")
        lines = top + [line for section, body in tables.items() for line in (f"[{section}]", *body)]
        lines += ["[launch.env]", *(f"{toml_str(k)} = {toml_str(v)}" for k, v in {ENV_X: self.x_value, **env}.items())]
        path = self.root / "overlay.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def x_value(self) -> str:
        return f"$(touch {self.sentinel}/x-at-p)"

    def ran(self) -> list[str]:
        return sorted(p.name for p in self.sentinel.iterdir())

    def attempt(self, values: dict[tuple[str, ...], object], env: dict[str, str], artifact: str, executor: str) -> bool:
        """Build and run; True if the recipe compiled (and the scripts were checked), False on RecipeError."""
        overlay = self.overlay({**values, ("launch", "executor"): executor}, env)
        try:
            compiled = build(RECIPE, overlays=[str(overlay)], artifact_dir=artifact)
            directory = compiled.write(self.root / "out")
        except RecipeError:
            assert self.ran() == []
            return False
        self.check_launch_sh(compiled, directory)
        if executor == "slurm":
            self.check_job(compiled, directory)
        return True

    def check_launch_sh(self, compiled, directory: Path) -> None:
        self.stubs.reset()
        proc = self.stubs.run(directory / "launch.sh", self.root)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert self.ran() == [], "a payload ran from launch.sh"
        (call,) = self.stubs.calls()
        assert call["prog"] == "python"
        assert call["argv"] == expand(supervised(node_argv(compiled, 0)), {})[1:]
        assert call["argv"][-2:] == ["--artifact", compiled.artifact_dir]
        for key, value in environment(compiled).items():
            assert call["env"].get(key) == value, key

    def check_job(self, compiled, directory: Path) -> None:
        self.stubs.reset()
        env = job_env(self.root)
        proc = self.stubs.run(directory / "job.sbatch", self.root, env)
        assert proc.returncode == 0, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert self.ran() == [], "a payload ran from job.sbatch"
        calls = {c["prog"]: c for c in self.stubs.calls()}
        assert set(calls) == {"scontrol", "srun", "python"}, calls.keys()
        task = task_argv(compiled)
        assert calls["srun"]["argv"][-3:] == ["bash", "-c", _TASK_PREFIX + join(task)]
        image = compiled.config.launch.container_image
        if image:
            assert f"--container-image={image}" in calls["srun"]["argv"]
        assert calls["python"]["argv"] == expand(task, {**env, "HEAD_NODE": HEAD})[1:]
        for key, value in environment(compiled).items():
            assert calls["python"]["env"].get(key) == value, key


FIELDS = string_fields()


def fields_in_scripts() -> list[tuple[str, ...]]:
    """The string fields whose value shows up in a generated script (probed with a marker), so that the
    random test spends most of its examples where a payload could do harm."""
    from recipec.compiler.executors.node import launch_sh
    from recipec.compiler.executors.slurm import sbatch_script

    found = []
    for path in FIELDS:
        marker = "zq" + "_".join(path)
        value: object = [marker] if typing.get_origin(_field_type(path)) is tuple else marker
        if path[-1] == "env":
            value = {"ZQ_PROBE": marker}
        tree: dict = {path[0]: value} if len(path) == 1 else {path[0]: {path[1]: value}}
        tree.setdefault("launch", {}).update({"executor": "slurm", "container_image": "img"} | tree["launch"])
        try:
            compiled = build(RECIPE, python=tree)
        except RecipeError:
            continue
        if marker in launch_sh(compiled) + sbatch_script(compiled):
            found.append(path)
    return found


SCRIPT_FIELDS = fields_in_scripts()


def _value_for(path: tuple[str, ...], payload: str) -> object:
    return [payload] if typing.get_origin(_field_type(path)) is tuple else payload


def test_the_walk_finds_the_fields_that_reach_scripts() -> None:
    names = {".".join(p) for p in FIELDS}
    assert {"name", "launch.output_dir", "launch.master_addr", "launch.slurm_account", "launch.container_mounts",
            "data.paths", "checkpoint.save"} <= names
    # launch.master_addr reaches a script only with nodes > 1 (one node uses torchrun --standalone):
    # test_master_addr_payloads_in_a_two_node_launch_sh attacks it there.
    assert {".".join(p) for p in SCRIPT_FIELDS} == {
        "name", "launch.output_dir", "launch.slurm_account", "launch.slurm_partition",
        "launch.slurm_time", "launch.container_image", "launch.container_mounts", "launch.env"}


@pytest.mark.parametrize("executor", ["local", "slurm"])
@pytest.mark.parametrize("index", range(len(payloads(Path("/")))))
def test_each_payload_in_every_string_field(tmp_path: Path, index: int, executor: str) -> None:
    attack = Attack(tmp_path)
    payload = payloads(attack.sentinel)[index]
    accepted = {}
    for path in FIELDS:  # compile-only first: which fields take this payload on their own
        if path[-1] == "env":
            continue
        value = _value_for(path, payload)
        try:
            build(RECIPE, overlays=[str(attack.overlay({path: value, ("launch", "executor"): executor}, {}))])
        except RecipeError:
            continue
        accepted[path] = value
    assert not attack.attempt({}, {payload: "1"}, "art", executor), "an env name that is not an identifier"
    env, artifact = {"PAYLOAD": payload}, f"art-{payload}"
    if not attack.attempt(accepted, env, artifact, executor):  # refused together: prove each part alone
        attack.attempt({}, env, "art", executor)
        attack.attempt({}, {}, artifact, executor)
        if accepted and not attack.attempt(accepted, {}, "art", executor):
            for path, value in accepted.items():
                assert attack.attempt({path: value}, {}, "art", executor), path
    assert attack.ran() == []


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_the_reported_payloads_arrive_verbatim(tmp_path: Path, executor: str) -> None:
    """The issue's reproductions: `${X@P}` in output_dir with X = "$(cmd)" in launch.env, and $(cmd) in -o."""
    attack = Attack(tmp_path)
    artifact = f"build/$(touch {attack.sentinel}/artifact)"
    assert attack.attempt({("launch", "output_dir"): "/runs/${X@P}"}, {}, artifact, executor)
    (call,) = [c for c in attack.stubs.calls() if c["prog"] == "python"]
    assert "--log-dir=/runs/${X@P}/logs/torchrun" in call["argv"]
    assert call["argv"][-2:] == ["--artifact", artifact]
    assert call["env"]["X"] == attack.x_value
    assert attack.ran() == []


def test_launch_sh_takes_the_node_rank_from_the_environment(tmp_path: Path) -> None:
    stubs = StubBin(tmp_path / "bin")
    directory = build(RECIPE, ["launch.nodes=2"]).write(tmp_path / "out")
    missing = stubs.run(directory / "launch.sh", tmp_path)
    assert missing.returncode != 0 and b"set NODE_RANK to the index of this node (0..1)" in missing.stderr
    assert stubs.calls() == []
    # launch.master_addr is the default 127.0.0.1, which no other node can reach: the head comes from $HEAD_NODE
    no_head = stubs.run(directory / "launch.sh", tmp_path, {"NODE_RANK": "1"})
    assert no_head.returncode != 0 and b"set HEAD_NODE to the address of node 0" in no_head.stderr
    assert stubs.calls() == []
    ok = stubs.run(directory / "launch.sh", tmp_path, {"NODE_RANK": "1", "HEAD_NODE": "10.0.0.7"})
    assert ok.returncode == 0, ok.stderr
    (call,) = stubs.calls()
    assert "--node-rank=1" in call["argv"] and "--nnodes=2" in call["argv"]
    assert "--rdzv-endpoint=10.0.0.7:29500" in call["argv"] and "--rdzv-conf=join_timeout=600" in call["argv"]


@pytest.mark.parametrize("index", range(len(payloads(Path("/")))))
def test_master_addr_payloads_in_a_two_node_launch_sh(tmp_path: Path, index: int) -> None:
    """launch.master_addr reaches launch.sh's --rdzv-endpoint when the job has several nodes."""
    attack = Attack(tmp_path)
    payload = payloads(attack.sentinel)[index]
    overlay = attack.overlay({("launch", "master_addr"): payload}, {})
    try:
        compiled = build(RECIPE, ["launch.nodes=2"], overlays=[str(overlay)])
        directory = compiled.write(tmp_path / "out")
    except RecipeError:
        assert attack.ran() == []
        assert any(ch in payload for ch in "\n\r\x00"), "only a line break or NUL is refused here"
        return
    proc = attack.stubs.run(directory / "launch.sh", tmp_path, {"NODE_RANK": "1", "HEAD_NODE": "h"})
    assert proc.returncode == 0, proc.stderr
    assert attack.ran() == [], "a payload ran from launch.sh"
    (call,) = attack.stubs.calls()
    assert f"--rdzv-endpoint={payload}:29500" in call["argv"]


def test_refusals_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    attack = Attack(tmp_path)
    cases = {
        ("launch", "output_dir"): ("a\nb", "[launch.output_dir]", "newline"),
        ("launch", "slurm_account"): ("a\nb", "[launch.slurm_account]", "newline"),
        ("launch", "slurm_partition"): ("x\x00", "[launch.slurm_partition]", "NUL"),
        ("launch", "slurm_time"): ("1:00:00\rx", "[launch.slurm_time]", "carriage return"),
        ("launch", "master_addr"): ("h\nx", "[launch.master_addr]", "newline"),
        ("launch", "container_image"): ("i\n", "[launch.container_image]", "newline"),
        ("launch", "container_mounts"): (["/a:/a", "/b\n:/b"], "[launch.container_mounts]", "newline"),
    }
    for path, (value, key, words) in cases.items():
        with pytest.raises(RecipeError) as info:
            build(RECIPE, overlays=[str(attack.overlay({path: value, ("launch", "executor"): "slurm"}, {}))])
        text = str(info.value)
        assert "overlay.toml:" in text and key in text and words in text, text


@pytest.mark.parametrize("key, words", [
    ("A=1;touch /tmp/x;B", "is not an identifier"),
    ("1ABC", "is not an identifier"),
    ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "unpickle"),
    ("LD_PRELOAD", "library"),
    ("BASH_ENV", "command substitution"),
    ("PYTHONWARNINGS", "imports that module"),
])
def test_env_keys_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, words: str) -> None:
    monkeypatch.chdir(tmp_path)
    attack = Attack(tmp_path)
    (tmp_path / "r.toml").write_text(f'extends = "{RECIPE}"\n[launch.env]\n{toml_str(key)} = "1"\n')
    with pytest.raises(RecipeError) as info:
        build(tmp_path / "r.toml")
    text = str(info.value)
    assert text.startswith("r.toml:3: [launch.env.") and words in text, text
    with pytest.raises(RecipeError, match="launch.env"):  # the same from the command line
        build(RECIPE, [f"+launch.env.{key}=1"])
    assert attack.ran() == []


def test_slurm_directive_values_must_be_plain(tmp_path: Path) -> None:
    attack = Attack(tmp_path)
    overlay = attack.overlay({("launch", "slurm_partition"): "gpu normal", ("launch", "executor"): "slurm"}, {})
    with pytest.raises(RecipeError, match=r"\[launch\.slurm_partition\] .*#SBATCH"):
        build(RECIPE, overlays=[str(overlay)])
    # the same value is fine where no #SBATCH line carries it
    build(RECIPE, overlays=[str(attack.overlay({("launch", "slurm_partition"): "gpu normal"}, {}))])


# Text built from the characters shells and TOML treat specially, with fragments of the payloads.
_ALPHABET = st.sampled_from(list("$`'\"\\;|&(){}[]<>*?!#~%=@:,. \t\n\x00-_aZ9/") + ["$(", "${", "@P}", "\\u0041"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.one_of(st.sampled_from(FIELDS), st.sampled_from(SCRIPT_FIELDS + [("env-key",), ("env-value",), ("artifact",)])),
    text=st.lists(_ALPHABET, min_size=1, max_size=12).map("".join),
    with_touch=st.booleans(),
    executor=st.sampled_from(["local", "slurm"]),
)
def test_random_metacharacters_never_run(tmp_path_factory: pytest.TempPathFactory, where: tuple[str, ...],
                                         text: str, with_touch: bool, executor: str) -> None:
    root = tmp_path_factory.mktemp("attack")
    attack = Attack(root)
    if with_touch:
        text = f"{text}$(touch {attack.sentinel}/h1)`touch {attack.sentinel}/h2`{text}"
    values: dict[tuple[str, ...], object] = {}
    env: dict[str, str] = {}
    artifact = str(root / "art")
    if where == ("env-key",):
        env[text] = "1"
    elif where == ("env-value",):
        env["PAYLOAD"] = text
    elif where == ("artifact",):
        artifact = str(root / f"art{text}")
    elif where[-1] == "env":
        env["PAYLOAD"] = text
    else:
        values[where] = _value_for(where, text)
    event("scripts ran" if attack.attempt(values, env, artifact, executor) else "RecipeError")
    assert attack.ran() == []


def test_overlay_writer_round_trips() -> None:
    import tomllib

    for text in ["a\x00b\n\r\t\"\\'`$", "\x7f\x1f"]:
        assert tomllib.loads(f"v = {toml_str(text)}")["v"] == text
    assert json.loads(json.dumps(toml_str("x")))
