"""Shared fixtures: a private q-psa cache per test, a prose file, one torch thread, the WikiText-2
test text beside the repository (paths and the bundled models: tests/helpers/bundled.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.bundled import WIKITEXT
from helpers.tiny import PROSE


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Tokenizer caches and downloads go to the test's own folder, never the user's."""
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prose(tmp_path) -> str:
    """Path of a UTF-8 file holding PROSE."""
    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    return str(path)


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread (a shared machine does not make each op wait for two);
    subprocesses get one OpenMP thread too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def wikitext() -> str:
    if not WIKITEXT.exists():
        pytest.skip(f"needs the WikiText-2 test text at {WIKITEXT}")
    return WIKITEXT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp cross-checks need llama-cpp-python")
