"""`q-psa prune` and `q-psa loop`: layer-list edits, held-out evaluation, pruned GGUF export, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.cli_run import run as cli
from helpers.tiny import write_tiny_gguf

from qpsa.edits.pruning import loop_candidates, prune_candidates, repeating, without
from qpsa.errors import QpsaError
from qpsa.model.layers import parse_layers
from qpsa.model.load import load_model
from qpsa.scores.base import LayerScores, eval_tokens
from qpsa.scores.results import ScoreRun
from qpsa.sources.texts import text_from_file

PROSE = ("Layers that do nothing can be removed; layers that matter cannot. The model reads this text "
         "and predicts each next token from the ones before it, 7 times over. ") * 40


@pytest.fixture
def setup(tmp_path):
    """A 5-layer tiny llama whose layer 2 is the identity, a text, and a rankings file for it."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", n_layer=5, identity_layer=2)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    loaded = load_model(str(model))
    tokens = eval_tokens(loaded, text_from_file(text), 64)
    scores = {
        "manual": LayerScores("manual", [5.0, 4.0, 0.0, 3.0, 2.0], [None] * 5, "test scores", 0.0),
        "tied": LayerScores("tied", [1.0, 1.0, 1.0, 0.5, 1.0], [0.1] * 5, "test scores", 0.0),
    }
    run = ScoreRun("baseline", {"name": "tiny", "path": str(model), "sha256": loaded.file.sha256,
                                "architecture": "llama", "n_layer": 5},
                   tokens.describe(), {"max_tokens": 64}, {"ppl": 1.0, "nll": 0.0}, scores)
    rankings = tmp_path / "rankings.json"
    run.save(rankings)
    return {"model": str(model), "text": str(text), "rankings": str(rankings), "loaded": loaded, "tmp": tmp_path}


def test_candidates_follow_ranking_with_documented_ties():
    s = LayerScores("m", [1.0, 1.0, 1.0, 0.5, 1.0], [None] * 5, "", 0.0)
    assert s.ranking() == [3, 0, 1, 2, 4]  # ties: lower layer index first
    assert prune_candidates(s, 2, 5) == [3, 0]
    assert prune_candidates(s, 2, 5, protect_first=1) == [3, 1]
    assert loop_candidates(s, 2, 5) == [4, 2]
    assert without(5, [3, 0]) == [1, 2, 4]
    assert repeating(4, [1], repeat=2) == [0, 1, 1, 1, 2, 3]
    nan_scores = LayerScores("m", [1.0, float("nan"), 0.2], [None] * 3, "", 0.0)
    assert nan_scores.ranking()[-1] == 1  # an unknown score is never pruned first


@pytest.mark.parametrize("text, message", [("7", "out of range"), ("1,1", "twice"), ("a", "not a layer"),
                                           ("", "empty"), ("3-1", "empty range")])
def test_layer_list_errors(text, message):
    with pytest.raises(QpsaError, match=message):
        parse_layers(text, 5)
    assert parse_layers("0-2,4", 5) == [0, 1, 2, 4]


def test_pruning_identity_layer_changes_nothing(capsys, setup):
    code, out, err = cli(capsys, "prune", setup["model"], "--rankings", setup["rankings"], "--methods", "manual",
                         "--k", 1, 2, "--text", setup["text"], "--json")
    assert code == 0, err
    report = json.loads(out)
    k1 = next(e for e in report["edits"] if e["k"] == 1)
    assert k1["layers"] == [2]
    assert abs(k1["ratio"] - 1) < 1e-6 and abs(k1["nll_delta"]) < 1e-6
    k2 = next(e for e in report["edits"] if e["k"] == 2)
    assert k2["layers"] == [2, 4] and k2["ratio"] != pytest.approx(1, abs=1e-6)
    assert report["eval_text"]["span"] == "held-out"
    assert report["eval_text"]["start_token"] >= 63  # disjoint from the 64-token score span


def test_looping_identity_layer_changes_nothing(setup):
    from qpsa.edits.pruning import HeldOutEvaluator

    loaded = setup["loaded"]
    ev = HeldOutEvaluator(loaded, eval_tokens(loaded, text_from_file(setup["text"]), 64, span="held-out"))
    same = ev.edit("manual", 1, [2], repeating(5, [2], repeat=3))
    assert abs(same.ratio - 1) < 1e-6
    other = ev.edit("manual", 1, [0], repeating(5, [0]))
    assert abs(other.ratio - 1) > 1e-4  # a real layer run twice does change the output


def test_loop_cli_table(capsys, setup):
    code, out, err = cli(capsys, "loop", setup["model"], "--rankings", setup["rankings"], "--k", 1, 2,
                         "--text", setup["text"])
    assert code == 0, err
    assert "K=1" in out and "K=2" in out and "manual" in out and "tied" in out


def test_pruned_gguf_export_matches_in_memory(capsys, setup):
    out_path = setup["tmp"] / "pruned.gguf"
    code, out, err = cli(capsys, "prune", setup["model"], "--layers", "1,3", "--output", out_path,
                         "--text", setup["text"], "--eval-tokens", 64, "--json")
    assert code == 0, err
    in_memory = json.loads(out)["edits"][0]
    pruned = load_model(str(out_path))
    assert pruned.config.n_layer == 3
    original = setup["loaded"]
    for new, old in enumerate([0, 2, 4]):  # every remaining tensor byte for byte, renumbered
        for suffix in ("attn_q.weight", "ffn_down.weight", "attn_norm.weight"):
            assert bytes(pruned.file.tensors[f"blk.{new}.{suffix}"].raw) == bytes(original.file.tensors[f"blk.{old}.{suffix}"].raw)
    tokens = eval_tokens(pruned, text_from_file(setup["text"]), 64, span="held-out")
    with torch.inference_mode():
        logits = pruned.model.forward(tokens.tokens)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], tokens.tokens[0, 1:]).item()
    assert math.exp(nll) == pytest.approx(in_memory["ppl"], rel=1e-5)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--k", 5], "at least one must stay"),
        (["--k", 4, "--protect-first", 1, "--protect-last", 1], "only 3 layers are left"),
        (["--k", 0], "--k"),
        (["--methods", "nope"], "'nope' is not in the rankings file"),
    ],
)
def test_prune_bad_input(capsys, setup, extra, needle):
    code, _, err = cli(capsys, "prune", setup["model"], "--rankings", setup["rankings"], "--text", setup["text"], *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_prune_output_refusals_write_nothing(capsys, setup):
    before = sorted(p.name for p in setup["tmp"].iterdir())
    for output in (setup["model"], setup["tmp"]):
        code, _, err = cli(capsys, "prune", setup["model"], "--layers", "1", "--output", output, "--text", setup["text"])
        assert code == 2, err
    code, _, err = cli(capsys, "prune", setup["model"], "--layers", "1", "--output", setup["tmp"] / "no" / "x.gguf")
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in setup["tmp"].iterdir()) == before


def test_rankings_from_another_model_refused(capsys, setup):
    other = write_tiny_gguf(setup["tmp"] / "other.gguf", "llama", n_layer=5, seed=7)
    code, _, err = cli(capsys, "prune", other, "--rankings", setup["rankings"], "--text", setup["text"])
    assert code == 2 and "another model" in err, err


def test_rankings_on_another_text_refused(capsys, setup):
    other = setup["tmp"] / "other.txt"
    other.write_text(PROSE.upper())
    code, _, err = cli(capsys, "prune", setup["model"], "--rankings", setup["rankings"], "--text", other)
    assert code == 2 and "computed on" in err, err
    code, out, err = cli(capsys, "prune", setup["model"], "--rankings", setup["rankings"], "--eval-text", other,
                         "--k", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["eval_text"]["span"] == "eval-text"
