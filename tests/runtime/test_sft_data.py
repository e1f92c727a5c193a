"""data.kind = "sft": jsonl records tokenized, one example per padded sequence, loss on the responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipec.compiler.errors import RecipeError
from recipec.runtime.sft import SFTDataError, build_sft_datasets, parse_line, tokenize_file
from recipec.runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SIZES = [64, 16, 0]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def build(path: Path, tmp: Path, seq_length: int = 32, split: str = "8,2,0", seed: int = 1234):
    return build_sft_datasets([str(path)], TOK, seq_length, split, seed, tmp / "cache", SIZES)


def trained_text(sample: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """The label bytes under the loss mask, and whether the eod label is among them."""
    labels = sample["labels"][sample["loss_mask"] > 0].tolist()
    return TOK.detokenize(labels), TOK.eod in labels


def test_loss_mask_covers_exactly_the_response_and_eod(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+3=", "response": "5"},
                                              {"prompt": "reverse: a b c\n", "response": "c b a"}])
    train, _ = build(path, tmp_path, split="1,0,0")
    seen = {}
    for i in range(len(train.examples)):
        s = train[i]
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (32,)
        assert s["position_ids"].tolist() == list(range(32))
        text, has_eod = trained_text(s)
        seen[text] = has_eod
        # labels are the tokens shifted by one; the padding is masked and holds pad ids
        used = int(s["loss_mask"].nonzero().max()) + 1
        assert s["tokens"][1:used].tolist() == s["labels"][:used - 1].tolist()
        assert (s["tokens"][used:] == TOK.pad).all() and (s["labels"][used:] == TOK.pad).all()
    assert seen == {"5": True, "c b a": True}
    # the first masked label is the first response byte: everything before it is prompt
    ids, target = parse_line("x", 1, json.dumps({"prompt": "ab", "response": "cd"}), TOK)
    assert ids == [97, 98, 99, 100, TOK.eod] and target == [0, 0, 1, 1, 1]


def test_messages_without_a_chat_template_train_on_assistant_turns(tmp_path: Path) -> None:
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                           {"role": "assistant", "content": "ciao"}]}
    ids, target = parse_line("x", 1, json.dumps(record), TOK)
    assert TOK.detokenize(ids) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nbye\n" \
                                  "<|assistant|>\nciao\n"
    assert TOK.detokenize([i for i, t in zip(ids, target) if t]) == "hello\nciao\n"
    assert ids[-1] == TOK.eod and target[-1] == 1


def test_long_examples_are_truncated_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 10, "response": "r" * 100},  # truncated
                                              {"prompt": "p" * 40, "response": "r"},  # response cut away: dropped
                                              {"prompt": "q", "response": "ok"}])
    arrays = tokenize_file(str(path), TOK, 32)
    assert int(arrays["truncated"]) == 2 and int(arrays["dropped"]) == 1 and arrays["lines"].tolist() == [1, 3]
    with caplog.at_level("INFO", logger="recipec.runtime"):
        train, _ = build(path, tmp_path, split="1,0,0")
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "truncated" in r.message)) == 1
    assert "2 of 3 examples were longer than seq_length + 1 = 33" in caplog.text and "1 had no response" in caplog.text
    texts = sorted(trained_text(train[i])[0] for i in range(2))
    assert texts == ["ok", "r" * 23]  # 33 tokens kept: 10 prompt + 23 response bytes
    long = next(train[i] for i in range(2) if trained_text(train[i])[0] != "ok")
    assert long["loss_mask"].sum() == 23 and not trained_text(long)[1]  # no eod: it was cut off


def test_split_and_epochs_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}:", "response": str(i)} for i in range(50)])
    a_train, a_valid = build(path, tmp_path / "a")
    b_train, _ = build(path, tmp_path / "b")
    c_train, _ = build(path, tmp_path / "c", seed=99)
    assert len(a_train.examples) == 40 and len(a_valid.examples) == 10
    assert a_train.examples.tolist() == b_train.examples.tolist() != c_train.examples.tolist()
    assert set(a_train.examples.tolist()).isdisjoint(a_valid.examples.tolist())
    assert len(a_train) == 80  # whole epochs covering the 64 requested samples
    for i in (0, 39, 40, 79):
        assert torch.equal(a_train[i]["tokens"], b_train[i]["tokens"])
    first = [a_train.example_index(i) for i in range(40)]
    second = [a_train.example_index(i) for i in range(40, 80)]
    assert sorted(first) == sorted(second) == sorted(a_train.examples.tolist()) and first != second


def test_cache_is_reused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    build(path, tmp_path)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    build(path, tmp_path)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")] == [stamp]


@pytest.mark.parametrize("line, what", [
    ('{"prompt": "a", "response": "b"', "line 3: not valid JSON"),
    ('["prompt", "response"]', "line 3: expected a JSON object, got list"),
    ('{"prompt": "a"}', 'line 3: missing "response"'),
    ('{"prompt": "a", "response": 7}', 'line 3: "response" must be a string, got int'),
    ('{"question": "a", "answer": "b"}', 'line 3: expected "prompt" and "response", or "messages"; got keys: answer, question'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'line 3: no message has role "assistant"'),
    ('{"messages": [{"role": "user"}]}', 'line 3: messages[0] must be an object with "role" and "content"'),
])
def test_malformed_line_names_file_line_and_problem(tmp_path: Path, line: str, what: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "", line])
    with pytest.raises(SFTDataError) as info:
        build(path, tmp_path)
    assert isinstance(info.value, RecipeError)
    assert str(info.value).startswith(f"{path}:3: ") and what.split(": ", 1)[1] in str(info.value), str(info.value)
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(SFTDataError, match=r"bin\.jsonl:2: not UTF-8 text"):
        build(path, tmp_path)
    with pytest.raises(SFTDataError, match=r"gone\.jsonl does not exist"):
        build(tmp_path / "gone.jsonl", tmp_path)


def test_messages_with_an_hf_chat_template_train_on_assistant_turns(tmp_path: Path) -> None:
    """A local byte-level HF tokenizer with a chat template, built offline for the test."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from recipec.runtime.tokenizer import HFTokenizer

    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    model = tokenizers.models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")
    fast.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|eot|>{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    fast.save_pretrained(tmp_path / "tok")
    hf = HFTokenizer(str(tmp_path / "tok"))
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    ids, target = parse_line("x", 1, json.dumps(record), hf)
    assert hf.detokenize(ids) == "[user]hi<|eot|>[assistant]hello<|eot|>[user]bye<|eot|>[assistant]ciao<|eot|>"
    trained = [i for i, t in zip(ids, target) if t]
    assert hf.detokenize(trained) == "hello<|eot|>ciao<|eot|>" and ids.count(hf.eod) == 4
