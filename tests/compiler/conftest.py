"""Fixtures of the compiler tests (no torch anywhere in tests/compiler)."""

from __future__ import annotations

from pathlib import Path

import pytest
from compiler_testlib import REPO


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository root, so displayed paths (and golden output) do not depend on the cwd."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty directory, so `build/<name>` lands in tmp and relative recipe paths are short."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
