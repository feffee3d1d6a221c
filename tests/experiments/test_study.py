"""`q-psa study --quick` end to end on a tiny model: every output written, tables consistent, rankings reusable."""

import json

from helpers.tiny import write_tiny_gguf

from qpsa.cli.app import main
from qpsa.scores.results import ScoreRun

PROSE = "The model reads this text and predicts each next token from the ones before it, 12 times. " * 120


def test_quick_study_writes_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    model = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", n_layer=6, identity_layer=4)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE)
    out = tmp_path / "study"
    capsys.readouterr()
    assert main(["study", str(model), "--quick", "--text", str(text), "--out", str(out)]) == 0
    for name in ("results.md", "study.json", "scores.json", "scores.csv", "scores.png", "prune.png", "loop.png",
                 "agreement.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out.replace("\n", "")  # rich wraps long paths
    assert printed.rstrip().endswith(f"report: {out / 'report.html'}")  # the last line: the page to open
    assert "Q-PSA study" in (out / "report.html").read_text()
    study = json.loads((out / "study.json").read_text())
    methods = set(study["scores"]["methods"])
    assert methods == {"layer_ablation", "weight_norm", "random", "block_influence", "angular_distance", "fisher", "qpsa"}
    assert {e["k"] for e in study["prune"]["edits"]} == {1, 2, 4}
    assert len(study["prune"]["edits"]) == 7 * 3 and len(study["loop"]["edits"]) == 7 * 2
    ablation_k1 = next(e for e in study["prune"]["edits"] if e["method"] == "layer_ablation" and e["k"] == 1)
    assert ablation_k1["layers"] == [4] and abs(ablation_k1["ratio"] - 1) < 1e-6  # the identity layer goes first
    assert study["convergence"][0]["n"] == 10 and study["convergence"][0]["layers"] == [0, 3]
    assert all(c["forward_equivalents"] > 0 for c in study["cost"].values())
    md = (out / "results.md").read_text()
    assert "## Pruning" in md and "## Looping" in md and "Spearman" in md
    # the rankings the study wrote feed `q-psa prune` directly
    ScoreRun.load(out / "scores.json")
    capsys.readouterr()
    assert main(["prune", str(model), "--rankings", str(out / "scores.json"), "--methods", "qpsa", "--k", "1",
                 "--text", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edits"][0]["method"] == "qpsa"
