"""Real result files of every kind, written once per session by running q-psa's commands on tiny
models the tests write (tests/tiny.py): a study folder, a baseline scores file, a prune file, a
tensor-level sensitivity, a plan folder, a compare JSON and a noise folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny import PROSE, write_tiny_gguf, write_wide_gguf

from qpsa.cli.app import main


def _run(*args) -> None:
    code = main([str(a) for a in args])
    assert code == 0, f"q-psa {' '.join(map(str, args))} failed ({code})"


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict[str, Path]:
    """kind -> path of a result of that kind (a folder for study, plan and noise)."""
    root = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QPSA_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        text = root / "prose.txt"
        text.write_text(PROSE, encoding="utf-8")
        small = write_tiny_gguf(root / "tiny.gguf", "llama", n_layer=6, identity_layer=4)
        # rows of 256 so K-quants fit, a separate head (as tests/test_requantize.py)
        wide = write_wide_gguf(root / "wide.gguf", n_layer=2)
        out = {}
        _run("study", small, "--quick", "--text", text, "--out", root / "study")
        out["study"] = root / "study"
        _run("baseline", small, "--methods", "layer_ablation", "weight_norm", "block_influence", "--max-tokens", 32,
             "--text", text, "--out", root / "baseline.json")
        out["scores"] = root / "baseline.json"
        _run("prune", small, "--rankings", out["scores"], "--k", 1, 2, "--text", text, "--out", root / "prune.json")
        out["edits"] = root / "prune.json"
        _run("sensitivity", wide, "--to", "q4_0", "--granularity", "tensor", "--text", text, "--ctx", 64,
             "--chunks", 2, "--out", root / "sens")
        out["sensitivity"] = root / "sens" / "sensitivity-Q4_0-tensor.json"
        _run("plan", wide, "--target-bpw", 6.0, "--types", "q8_0", "q4_0", "--text", text, "--ctx", 64, "--chunks", 2,
             "--out", root / "plan")
        out["plan"] = root / "plan"
        base = write_tiny_gguf(root / "base.gguf", "llama", seed=3, tied=False)
        compare = _compare(root, base, text)
        out["compare"] = compare
        _run("noise", small, "--text", text, "--ctx", 64, "--chunks", 2, "--sigma", 0.01, 0.1, "--typo-rate", 0.2,
             "--new-tokens", 3, "--out", root / "noise")
        out["noise"] = root / "noise"
    torch.set_num_threads(threads)
    return out


def _compare(root: Path, base: Path, text: Path) -> Path:
    """`q-psa compare BASE --type Q4_0 --json`, stdout kept as the results file (as a user would)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _run("compare", base, "--type", "Q4_0", "--text", text, "--ctx", 64, "--chunks", 4, "--max-new-tokens", 6,
             "--json")
    path = root / "compare.json"
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path
