"""Data caches keyed by content (issue 11): a text corpus, an SFT file or an HF tokenizer changed
in place is packed / tokenized again, never answered from the stale cache (the text pack used to
be keyed by path only); unchanged content is reused; concurrent builders agree."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from recipec.compiler import build
from recipec.runtime import cache
from recipec.runtime.corpus import pack
from recipec.runtime.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from launch_helpers import free_tcp_port  # noqa: E402

TOK = ByteTokenizer()


def pack_texts(prefix: str) -> list[str]:
    """The documents of an indexed-dataset pack, decoded (end-of-text dropped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    return [TOK.detokenize([int(i) for i in data[k]]) for k in range(len(data))]


def same_size_edit(path: Path, text: str) -> None:
    """Rewrite `path` with `text` (same byte count) and put its old mtime back: what size + mtime
    keys cannot see (tar/rsync/cp -p can restore mtimes; coarse file systems share one)."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_content_key_follows_content_not_path_or_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta")
    b.write_text("alpha beta")
    os.utime(b, ns=(1, 1))
    assert cache.content_key(a) == cache.content_key(b)  # a copy, a touch: reused
    key = cache.content_key(a)
    same_size_edit(a, "alpha BETA")
    assert cache.content_key(a) != key
    # Large files: size + mtime_ns + the hash of both ends (a full read would cost more than the cache saves).
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 64)
    monkeypatch.setattr(cache, "EDGE_BYTES", 16)
    big = tmp_path / "big.txt"
    big.write_text("h" * 16 + "m" * 100 + "t" * 16)
    key = cache.content_key(big)
    assert key.startswith(f"size:132|mtime_ns:{big.stat().st_mtime_ns}|edges:")
    for edit in ("H" + "h" * 15 + "m" * 100 + "t" * 16, "h" * 16 + "m" * 100 + "t" * 15 + "T"):
        same_size_edit(big, edit)
        assert cache.content_key(big) != key
    same_size_edit(big, "h" * 16 + "m" * 100 + "t" * 16)
    assert cache.content_key(big) == key
    os.utime(big, ns=(5, 5))
    assert cache.content_key(big) != key  # any ordinary write moves the mtime


def test_text_pack_is_rebuilt_when_the_corpus_changes(tmp_path: Path) -> None:
    """Was: keyed by path, so the edited corpus trained on the old pack."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first document\n\nsecond one")
    old = pack(str(corpus), TOK, tmp_path / "data")
    assert pack_texts(old) == ["first document", "second one"]
    same_size_edit(corpus, "FIRST DOCUMENT\n\nsecond ONE")
    new = pack(str(corpus), TOK, tmp_path / "data")
    assert new != old and pack_texts(new) == ["FIRST DOCUMENT", "second ONE"]
    # Unchanged content (even under another name) is not packed again.
    stamp = Path(f"{new}.bin").stat().st_mtime_ns
    assert pack(str(corpus), TOK, tmp_path / "data") == new and Path(f"{new}.bin").stat().st_mtime_ns == stamp
    copy = tmp_path / "corpus.txt.bak"
    copy.write_bytes(corpus.read_bytes())
    assert Path(pack(str(copy), TOK, tmp_path / "data")).name.split("_")[-3] == Path(new).name.split("_")[-3]
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temporaries left


def _pack_in_child(args: tuple[str, str]) -> str:
    corpus, data = args
    return pack(corpus, ByteTokenizer(), Path(data))


def test_concurrent_packers_publish_one_valid_pack(tmp_path: Path) -> None:
    """Ranks on nodes that share no rank 0 (or several jobs on one cache) may pack at once: each
    writes its own temporary and renames it into place, so the pack is always whole."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document number {i} " * 50 for i in range(200)))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        prefixes = pool.map(_pack_in_child, [(str(corpus), str(tmp_path / "data"))] * 4)
    assert len(set(prefixes)) == 1
    assert pack_texts(prefixes[0]) == [(f"document number {i} " * 50).strip() for i in range(200)]
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def test_sft_cache_follows_the_file_content(tmp_path: Path) -> None:
    """Was keyed by path + size + mtime: a same-size edit with its mtime restored reused stale tokens."""
    from recipec.runtime.sft import build_sft_datasets

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "abc"}) + "\n")

    def responses() -> set[str]:
        train, _ = build_sft_datasets([str(path)], TOK, 16, "1,0,0", 1, tmp_path / "cache", [4, 0, 0])
        return {TOK.detokenize(train[i]["labels"][train[i]["loss_mask"] > 0].tolist()) for i in range(len(train))}

    assert responses() == {"abc"}
    same_size_edit(path, json.dumps({"prompt": "q", "response": "xyz"}) + "\n")
    assert responses() == {"xyz"}
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_a_damaged_sft_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    from recipec.runtime.sft import build_sft_datasets

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "abc"}) + "\n")
    build_sft_datasets([str(path)], TOK, 16, "1,0,0", 1, tmp_path / "cache", [4, 0, 0])
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:50])
    train, _ = build_sft_datasets([str(path)], TOK, 16, "1,0,0", 1, tmp_path / "cache", [4, 0, 0])
    assert TOK.detokenize(train[0]["labels"][train[0]["loss_mask"] > 0].tolist()) == "abc"


def test_hf_tokenizer_identity_follows_its_files(tmp_path: Path) -> None:
    """Packs and SFT caches are keyed by the tokenizer too: one replaced in place must not reuse them."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from recipec.runtime.tokenizer import HFTokenizer

    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(tmp_path / "tok")
    before = HFTokenizer(str(tmp_path / "tok")).unique_identifiers
    assert before == HFTokenizer(str(tmp_path / "tok")).unique_identifiers
    fast.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(tmp_path / "tok")
    assert HFTokenizer(str(tmp_path / "tok")).unique_identifiers != before


@pytest.mark.timeout(600)
def test_a_corpus_changed_between_two_runs_is_packed_again(tmp_path: Path) -> None:
    """Two real runs on one output directory; between them the corpus is edited in place (same size,
    mtime restored). The second run's dataset is built on a pack of the new text."""
    corpus = tmp_path / "corpus.txt"
    docs = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)]
    corpus.write_text("\n\n".join(docs))
    out = tmp_path / "out"
    directory = build("llama3_tiny", ["data.kind=text", f'data.paths=["{corpus}"]', "tokenizer.type=byte",
                                      f"launch.output_dir={out}", "train.train_iters=1",
                                      "train.eval_interval=100"]).write(tmp_path / "b")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run() -> set[str]:
        proc = subprocess.run([sys.executable, "-m", "recipec.runtime.train", "--artifact", str(directory)],
                              check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**env, "MASTER_PORT": str(free_tcp_port())})
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        # The packs the run's datasets were built on, as Megatron recorded them in its index cache.
        return {json.loads(p.read_text())["dataset_path"] for p in (out / "data" / "index_cache").glob("*-train-description.txt")}

    first = run()
    assert len(first) == 1 and pack_texts(next(iter(first))) == docs
    new_docs = [d.replace("fox", "cat") for d in docs]
    same_size_edit(corpus, "\n\n".join(new_docs))
    second = run() - first
    assert len(second) == 1, "the second run did not build its dataset on a new pack"
    assert pack_texts(next(iter(second))) == new_docs
