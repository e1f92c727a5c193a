"""Text corpora packed into Megatron indexed datasets (.bin/.idx) at start-up.

`builtin:tiny_corpus` is real English text the project generates rather than
ships: the docstrings of a fixed list of Python standard-library modules
(several MB of prose about programming), so the CPU main job learns something
measurable with no download. Any other path is a UTF-8 text file; blank lines
separate documents.

Packs are cached under the run's data directory, named by the content they were made from
(runtime/cache.py): the corpus file's content key (for the built-in corpus, the Python version
whose docstrings it is) and the tokenizer's identity. A corpus edited between two runs is packed
again; an unchanged one, even copied or touched, is not. Rank 0 says which happened, and how long
packing took ("packed corpus X: N documents, M tokens in 2.1 s (cached at ...)", or "reused cached
pack ..."): the first run of a large corpus spends minutes here, and the log must show why.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from recipec.compiler.errors import Problem, RecipeError

from .cache import build_once, content_key, short_hash, temp_path
from .logs import Progress

log = logging.getLogger("recipec.runtime")

BUILTIN = "builtin:tiny_corpus"
_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "ftplib", "functools", "glob", "gzip", "heapq", "hashlib", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
    "multiprocessing", "operator", "os", "pathlib", "pickle", "platform", "queue", "random", "re",
    "sched", "secrets", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def builtin_documents() -> list[str]:
    """One document per module: its docstring and those of its public classes and functions."""
    documents = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            documents.append(text)
    return documents


class CorpusError(RecipeError):
    """A text corpus that cannot be packed: unreadable, not UTF-8, or without any text."""


def _corpus_error(path: str, what: str, hint: str) -> CorpusError:
    return CorpusError([Problem(CorpusError, f"{path}: {what}", key="data.paths", hint=hint)])


def read_documents(path: str) -> list[str]:
    """The documents of a corpus (blank lines separate them); a CorpusError for a file that has none."""
    if path == BUILTIN:
        return builtin_documents()
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _corpus_error(path, f"cannot read the text file ({exc.strerror})",
                            "paths are relative to the directory the run starts in") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _corpus_error(path, f"line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "data.kind = \"text\" reads UTF-8 text files; for binary token files use "
                            "data.kind = \"indexed\" (PREFIX.bin + PREFIX.idx)") from None
    documents = [doc.strip() for doc in text.split("\n\n") if doc.strip()]
    if not documents:
        raise _corpus_error(path, f"no text to train on ({len(raw)} bytes, all blank)",
                            "give data.paths files with text in them (blank lines separate documents)")
    return documents


def source_key(path: str) -> str:
    """What a pack of `path` depends on besides the tokenizer (runtime/cache.py's content key)."""
    if path == BUILTIN:  # its text is the docstrings of this Python's standard library
        return f"builtin|{sys.version}|{short_hash(*_MODULES)}"
    try:
        return content_key(path)
    except OSError as exc:
        raise _corpus_error(path, f"cannot read the text file ({exc.strerror})",
                            "paths are relative to the directory the run starts in") from None


def pack(path: str, tokenizer: Any, cache_dir: Path) -> str:
    """The indexed-dataset prefix of `path`'s tokens, packed once per content and tokenizer."""
    ident = short_hash(source_key(path), sorted(tokenizer.unique_identifiers.items()))
    stem = "tiny_corpus" if path == BUILTIN else Path(path).stem
    prefix = cache_dir / f"{stem}_{ident}_text_document"
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")

    def ready() -> bool:
        return idx_path.exists() and bin_path.exists()

    built: list[bool] = []

    def build() -> None:
        progress = Progress(f"packing corpus {path}", unit="documents")
        documents = read_documents(path)
        progress.total = len(documents)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(prefix)
        tokens = 0
        try:
            vocab = tokenizer.vocab_size
            builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=numpy.uint16 if vocab < 65500 else numpy.int32)
            for done, document in enumerate(documents, 1):
                ids = tokenizer.tokenize(document) + [tokenizer.eod]
                tokens += len(ids)
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                progress.update(done)
            builder.finalize(f"{tmp}.idx")
            Path(f"{tmp}.bin").replace(bin_path)
            Path(f"{tmp}.idx").replace(idx_path)  # last: the pair is complete once the .idx exists
        finally:  # a failed build (a full disk) leaves no half-written temporaries behind
            for leftover in (Path(f"{tmp}.bin"), Path(f"{tmp}.idx")):
                leftover.unlink(missing_ok=True)
        built.append(True)
        log.info(f"packed corpus {path}: {len(documents):,} documents, {tokens:,} tokens in {progress.elapsed()} "
                 f"(cached at {prefix}.bin/.idx)")

    build_once(ready, build)
    if not built:  # (the other ranks say so too, but only rank 0 logs INFO)
        log.info(f"reused cached pack {prefix}.bin/.idx for corpus {path}")
    return str(prefix)
