"""Text corpora packed into Megatron indexed datasets (.bin/.idx) at start-up.

`builtin:tiny_corpus` is real English text the project generates rather than
ships: the docstrings of a fixed list of Python standard-library modules
(several MB of prose about programming), so the CPU main job learns something
measurable with no download. Any other path is a UTF-8 text file; blank lines
separate documents.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

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


def read_documents(path: str) -> list[str]:
    if path == BUILTIN:
        return builtin_documents()
    text = Path(path).read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def pack(path: str, tokenizer: object, cache_dir: Path) -> str:
    """The indexed-dataset prefix for `path`, building it once (atomically) if needed."""
    ident = hashlib.sha256(f"{path}|{sorted(tokenizer.unique_identifiers.items())}".encode()).hexdigest()[:12]  # type: ignore[attr-defined]
    stem = "tiny_corpus" if path == BUILTIN else Path(path).stem
    prefix = cache_dir / f"{stem}_{ident}_text_document"
    if Path(f"{prefix}.idx").exists() and Path(f"{prefix}.bin").exists():
        return str(prefix)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{prefix.name}.{os.getpid()}"
    vocab = tokenizer.vocab_size  # type: ignore[attr-defined]
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=numpy.uint16 if vocab < 65500 else numpy.int32)
    for document in read_documents(path):
        ids = tokenizer.tokenize(document) + [tokenizer.eod]  # type: ignore[attr-defined]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return str(prefix)
