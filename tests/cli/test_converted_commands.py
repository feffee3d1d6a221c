"""Every architecture through the commands, on the tiny models llama.cpp's converter made
(tests/helpers/converted.py): ppl, baseline, score, prune, loop, sensitivity and compare run, and
what they report is finite and sane. Short runs (64-token windows, few samples): a smoke test, the
numbers themselves are checked elsewhere."""

from __future__ import annotations

import json
import math

import pytest
from helpers.cli_run import run
from helpers.converted import converted

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FAMILIES = ["llama2", "llama3", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "phi3"]


def _json(capsys, *args) -> dict:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return json.loads(out)


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("family", FAMILIES)
def test_commands_on_converted_model(tmp_path, capsys, prose, family):
    model = converted(family)
    common = ("--text", prose)
    assert run(capsys, "inspect", model)[0] == 0
    ppl = _json(capsys, "ppl", model, *common, "--ctx", 64, "--chunks", 2, "--json")
    assert _finite(ppl["ppl"]) and ppl["ppl"] > 1, ppl  # a random model: confidently wrong, so far above V

    base = tmp_path / "baseline.json"
    code, _, err = run(capsys, "baseline", model, *common, "--max-tokens", 64, "--out", base, "--methods",
                       "layer_ablation", "weight_norm", "block_influence", "angular_distance", "fisher")
    assert code == 0, err
    methods = json.loads(base.read_text())["methods"]
    assert len(methods) == 5
    for name, m in methods.items():
        assert len(m["scores"]) == 3 or len(m["scores"]) == 4, name
        assert _finite(*m["scores"]), (name, m["scores"])

    score = _json(capsys, "score", model, *common, "--samples-per-matrix", 2, "--max-tokens", 24, "--json",
                  "--out", tmp_path / "score.json")
    assert _finite(*score["methods"]["qpsa"]["scores"]), score["methods"]["qpsa"]

    for command in ("prune", "loop"):
        out = tmp_path / f"{command}.json"
        code, _, err = run(capsys, command, model, "--rankings", base, "--k", 1, *common, "--out", out)
        assert code == 0, err
        edits = json.loads(out.read_text())["edits"]
        assert edits and all(_finite(e["ratio"]) and e["ratio"] > 0 for e in edits), edits

    code, _, err = run(capsys, "sensitivity", model, "--to", "q8_0", *common, "--ctx", 64, "--chunks", 2,
                       "--out", tmp_path / "sens")
    assert code == 0, err
    sens = json.loads(next((tmp_path / "sens").glob("sensitivity-*.json")).read_text())
    assert sens["rows"] and all(_finite(r["kld"]) and r["kld"] >= 0 for r in sens["rows"]), sens["rows"][:2]

    cmp = _json(capsys, "compare", model, "--type", "Q8_0", *common, "--ctx", 64, "--chunks", 2,
                "--max-new-tokens", 4, "--json")
    stats = cmp["statistics"]
    assert _finite(stats["kld"], stats["ppl"]) and 0 < stats["kld"] < 1 and stats["same_top"] > 0.5, stats
