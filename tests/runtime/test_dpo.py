"""train.mode = "dpo" (compiler/modes/dpo.py, runtime/modes/dpo*.py).

In this process (single-rank gloo, fp32) on the tiny recipe's GPTModel: recipec's DPO forward step
gives the loss and gradients of a hand-written DPO (log-softmax over full logits, an independently
built reference model) within 1e-5, for full finetuning (a reference copy) and for LoRA (the
reference is the base: adapters bypassed). Through `recipec launch` (real torchrun, CPU): reward
accuracy rises on a separable toy preference set; TP=2 gives TP=1's losses; a run saved at step 5
(under TP=2) and resumed on two data-parallel ranks gives the uninterrupted run's losses.
The compiler half: its refusals and the reference model in the memory estimate.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
torch = pytest.importorskip("torch")

from recipec.compiler import build
from recipec.compiler.errors import RecipeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import clean_env, recipec_cmd

TOL = 1e-5
WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow")


def preference_pairs(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Separable pairs: the chosen answer starts "yes", the rejected one "no"; the rest is shared noise."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        tail = " ".join(rng.choice(WORDS) for _ in range(2))
        lines.append(json.dumps({"prompt": f"q: {words}\na:", "chosen": f" yes {tail}", "rejected": f" no {tail}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


# --- compiler half -------------------------------------------------------------------------------

DPO = ["train.mode=dpo", "data.kind=sft", 'data.paths=["p.jsonl"]']


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["train.mode=dpo"], "data.kind", 'train.mode "dpo" reads jsonl preference records'),
    ([*DPO, "train.micro_batch_size=3", "train.global_batch_size=15"], "train.micro_batch_size", "must be even"),
    ([*DPO, "parallel.pipeline_model_parallel_size=2", "launch.gpus_per_node=2"],
     "parallel.pipeline_model_parallel_size", "pipeline"),
    ([*DPO, "data.packing=true"], "data.packing", "packing is not supported"),
    ([*DPO, "+train.mode_options.beta=0"], "train.mode_options.beta", "must be > 0"),
    ([*DPO, "+train.mode_options.betta=0.2"], "train.mode_options.betta", "has no option 'betta'"),
])
def test_dpo_refuses_what_it_cannot_run(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(RecipeError) as info:
        build("llama3_tiny", overrides)
    problems = [p for p in info.value.problems if p.key == key]
    assert problems and words in problems[0].message, str(info.value)


def test_reference_copy_enters_the_estimate_but_lora_shares_the_base() -> None:
    full = build("llama3_tiny_dpo", []).plan
    sft = build("llama3_tiny_dpo", ["train.mode=sft", "~train.mode_options"]).plan
    assert full.memory_gib["extra_models"] == pytest.approx(sft.memory_gib["weights"], abs=0.01)
    assert sft.memory_gib["extra_models"] == 0
    assert full.flops_per_step == pytest.approx(sft.flops_per_step * 4 / 3, rel=1e-6)  # + one forward
    lora = build("llama3_8b_dpo_lora", []).plan
    assert lora.memory_gib["extra_models"] == 0


# --- in-process: the loss and gradients against a hand-written DPO ------------------------------------

BETA, SMOOTHING = 0.5, 0.1


def _compiled(tmp_path: Path, *overrides: str):
    data = preference_pairs(tmp_path / "pairs.jsonl", n=8)
    return build("llama3_tiny_dpo", [f"data.paths=[{json.dumps(str(data))}]", "launch.gpus_per_node=1",
                                     f"train.mode_options.beta={BETA}", f"train.mode_options.label_smoothing={SMOOTHING}",
                                     "~train.eval_interval", "model.seq_length=48", *overrides])


def _base_model(c, padded: int):
    from recipec.runtime.init import keyed_init
    from recipec.runtime.model import build_model_chunks

    chunks, _ = build_model_chunks(c, padded, on_gpu=False)
    keyed_init(chunks, c.train.seed, c.model.init_method_std, c.model.num_layers)
    return chunks[0]


def _mode(compiled, tmp_path: Path, model):
    from recipec.runtime.modes import build_mode
    from recipec.runtime.modes.base import Context

    mode = build_mode(Context(config=compiled.config, plan=compiled.plan, device=torch.device("cpu"), on_gpu=False,
                              out_dir=tmp_path))
    mode.build_extra_models([model])
    mode.build_data()
    return mode


def _hand_written_dpo(policy, reference, batch) -> torch.Tensor:
    """DPO from the definition: log-softmax of full logits, answer tokens summed, cDPO smoothing."""
    def logps(model):
        logits = model(batch["tokens"], batch["position_ids"], None).float()
        token = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        return (token * batch["loss_mask"]).sum(-1)

    pi = logps(policy)
    with torch.no_grad():
        ref = logps(reference)
    k = pi.shape[0] // 2
    z = BETA * ((pi[:k] - ref[:k]) - (pi[k:] - ref[k:]))
    return (-(1 - SMOOTHING) * torch.log(torch.sigmoid(z)) - SMOOTHING * torch.log(torch.sigmoid(-z))).mean()


def _check_against_hand_written(mode, policy, reference) -> dict[str, float]:
    batch = mode.microbatches("train", 0)[0]
    assert batch["tokens"].shape[0] == 8  # micro_batch_size counts sequences: 4 pairs
    params = [p for p in policy.parameters() if p.requires_grad]
    output, loss_func = mode.forward_step(iter([batch]), policy)
    loss, metrics = loss_func(output)
    ours = torch.autograd.grad(loss, params)
    want = _hand_written_dpo(policy, reference, batch)
    theirs = torch.autograd.grad(want, params)
    assert abs(loss.item() - want.item()) <= TOL, (loss.item(), want.item())
    assert abs(loss.item() - 0.6931) > 1e-3  # the policy differs from the reference: a real test
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    assert worst <= TOL, worst
    assert sum(t.abs().sum().item() for t in theirs) > 0
    return {k: float(v) for k, v in metrics.items()}


def test_full_finetuning_loss_and_gradients_match_hand_written_dpo(mcore_tp1, tmp_path: Path) -> None:
    compiled = _compiled(tmp_path)
    padded = compiled.plan.padded_vocab_size
    policy = _base_model(compiled.config, padded)
    with torch.no_grad():  # move the policy away from the start weights (the reference)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    mode = _mode(compiled, tmp_path, policy)
    assert mode.reference is not None and not any(p.requires_grad for p in mode.reference[0].parameters())
    metrics = _check_against_hand_written(mode, policy, _base_model(compiled.config, padded))
    assert set(metrics) == set(mode.metrics) and 0.0 <= metrics["reward accuracy"] <= 1.0


def test_lora_reference_is_the_base_with_adapters_bypassed(mcore_tp1, tmp_path: Path) -> None:
    from recipec.runtime.lora import apply_lora, init_adapters

    compiled = _compiled(tmp_path, "peft.method=lora", "peft.lora_rank=4", "peft.lora_alpha=8.0")
    padded = compiled.plan.padded_vocab_size
    policy = _base_model(compiled.config, padded)
    apply_lora([policy], compiled.config)
    init_adapters([policy], compiled.config.train.seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("adapter.linear_out.weight"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    mode = _mode(compiled, tmp_path, policy)
    assert mode.reference is None  # no second copy: the same chunks, adapters bypassed
    _check_against_hand_written(mode, policy, _base_model(compiled.config, padded))
    assert policy.training and type(policy.decoder.layers[0].mlp.linear_fc1).__name__.startswith("LoRA")


def test_messages_records_score_only_the_answers_assistant_turns(tmp_path: Path) -> None:
    from recipec.runtime.modes.dpo_data import load_pairs, parse_pair
    from recipec.runtime.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"},
              {"role": "user", "content": "again?"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no!"}]}
    (c_ids, c_t), (r_ids, r_t) = parse_pair("p.jsonl", 1, json.dumps(record), tok)
    scored = bytes(i for i, t in zip(c_ids, c_t) if t and i < 256)
    assert scored == b"yes\n" and c_ids[-1] == tok.eod and c_t[-1] == 1
    assert bytes(i for i, t in zip(r_ids, r_t) if t and i < 256) == b"no!\n"
    with pytest.raises(RecipeError, match=r"p\.jsonl:3: .*got keys: prompt, response"):
        parse_pair("p.jsonl", 3, json.dumps({"prompt": "a", "response": "b"}), tok)
    with pytest.raises(RecipeError, match="no jsonl file at"):
        load_pairs([str(tmp_path / "missing.jsonl")], tok, 32, "1,0,0", 0)


# --- through `recipec launch` -------------------------------------------------------------------------

COMMON = ["logging.log_interval=1", "scheduler.lr_decay_iters=10", "checkpoint.save_interval=5",
          "train.eval_interval=10", "optimizer.lr=3e-3"]


class Launch:
    """One `recipec launch llama3_tiny_dpo` run in its own directory (its checkpoints and metrics there)."""

    def __init__(self, root: Path, name: str, nproc: int, data: Path) -> None:
        self.dir, self.nproc, self.data = root / name, nproc, data
        self.dir.mkdir(exist_ok=True)

    def run(self, *overrides: str) -> str:
        argv = recipec_cmd("launch", "llama3_tiny_dpo", f"launch.gpus_per_node={self.nproc}",
                           f"data.paths=[{json.dumps(str(self.data))}]", *COMMON, *overrides, "-o", "build")
        proc = subprocess.run(argv, cwd=self.dir, env=clean_env(), capture_output=True, text=True, timeout=600,
                              check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        return out

    def records(self) -> dict[int, dict[str, float]]:
        path = self.dir / "runs" / "llama3_tiny_dpo" / "metrics.jsonl"
        return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _close(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], steps: range, what: str) -> None:
    diffs = {s: abs(got[s]["loss"] - want[s]["loss"]) for s in steps}
    assert max(diffs.values()) <= TOL, f"{what}: |loss diff| per step {diffs}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return preference_pairs(root / "pairs.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(root: Path, data: Path) -> tuple[Launch, str]:
    run = Launch(root, "tp1", 1, data)
    return run, run.run("train.train_iters=10")


def test_reward_accuracy_rises_on_separable_pairs(uninterrupted: tuple[Launch, str]) -> None:
    run, out = uninterrupted
    records = run.records()
    assert sorted(records) == list(range(1, 11)), out[-3000:]
    assert abs(records[1]["loss"] - 0.6931) < 1e-3  # step 1: the policy is the reference
    assert records[1]["reward accuracy"] == 0.0 and records[1]["reward margin"] == 0.0
    late = [records[s] for s in (8, 9, 10)]
    assert all(r["reward accuracy"] == 1.0 for r in late), [r["reward accuracy"] for r in late]
    assert sum(r["loss"] for r in late) / 3 < 0.6, [r["loss"] for r in late]
    assert all(r["reward margin"] > 0 for r in late)
    assert "dpo: reference model (frozen, forward only)" in out and "eval at step 10" in out


def test_tp2_then_resumed_on_dp2_gives_the_uninterrupted_losses(root: Path, data: Path,
                                                                 uninterrupted: tuple[Launch, str]) -> None:
    want = uninterrupted[0].records()
    run = Launch(root, "tp2_dp2", 2, data)
    run.run("train.train_iters=5", "parallel.tensor_model_parallel_size=2")
    _close(run.records(), want, range(1, 6), "TP=2")
    out = run.run("train.train_iters=10")  # same directory: resumes at step 6, now DP=2
    assert "continuing at step 6" in out, out[-3000:]
    _close(run.records(), want, range(6, 11), "resumed at step 5 on DP=2")
