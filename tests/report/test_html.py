"""`q-psa report` / `qpsa.report.html`: the page holds every number of each kind of result, with its ±,
is self-contained, and bad input is one clean error line."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil

import pytest
from helpers.cli_run import assert_user_error, run
from helpers.report_inputs import data_of, pm

from qpsa.errors import QpsaError
from qpsa.report.html import detect_kind, write_report, write_report_beside
from qpsa.report.html.load import load_results


def page(results, kind, tmp_path) -> tuple[str, dict]:
    out = write_report([results[kind]], tmp_path / f"{kind}.html")
    return out.read_text(encoding="utf-8"), data_of(results[kind])


def text_of(doc: str) -> str:
    """The page's visible text (tags dropped, entities decoded), whitespace collapsed."""
    doc = re.sub(r"<(script|style)\b.*?</\1>", " ", doc, flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", doc)))


def assert_self_contained(doc: str) -> None:
    assert doc.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=|<link\b|<img\b|<iframe\b|@import|url\(\s*['\"]?https?:", doc, re.IGNORECASE)
    assert not re.search(r"""(?:href|src)\s*=\s*["']?(?:https?:)?//""", doc, re.IGNORECASE)


@pytest.mark.parametrize("kind", ["study", "scores", "edits", "sensitivity", "plan", "compare", "noise"])
def test_every_kind_is_recognised_and_written(results, kind, tmp_path):
    loaded = load_results([results[kind]])
    assert [r.kind for r in loaded] == [kind]
    doc, _ = page(results, kind, tmp_path)
    assert_self_contained(doc)
    assert "<svg" in doc and "<title>" in doc
    assert len(doc.encode()) < 10 * 2**20


def test_study_page_shows_the_header_every_score_and_every_edit(results, tmp_path):
    doc, d = page(results, "study", tmp_path)
    text = text_of(doc)
    s = d["scores"]
    for needle in (d["model"]["sha256"], s["text"]["sha256"], d["model"]["architecture"], s["versions"]["torch"],
                   s["created"], f"{s['versions']['threads']} torch threads"):
        assert needle in text
    for name, m in s["methods"].items():
        assert m["unit"] in text
        for v, u in zip(m["scores"], m["uncertainty"]):
            assert (format(v, ".4g") if u is None else pm(v, u)) in text, (name, v, u)
    for report in (d["prune"], d["loop"]):
        for e in report["edits"]:
            assert pm(e["ratio"], e["ratio_se"]) in text
    for a in d["agreement"]:
        assert format(a["spearman"], ".3f") in text and format(a["kendall"], ".3f") in text
    for c in d["convergence"]:
        assert format(c["spearman"], ".3f") in text
    # hover: every bar carries its value ± uncertainty
    titles = re.findall(r"<title>([^<]*)</title>", doc)
    ablation = s["methods"]["layer_ablation"]
    assert f"layer_ablation, layer 0: {pm(ablation['scores'][0], ablation['uncertainty'][0])}" in \
        " ".join(html.unescape(t) for t in titles)


def test_scores_page_has_rank_agreement_computed_from_the_file(results, tmp_path):
    from scipy.stats import spearmanr

    doc, d = page(results, "scores", tmp_path)
    m = d["methods"]
    rho = spearmanr(m["block_influence"]["scores"], m["layer_ablation"]["scores"])[0]
    assert "Rank agreement" in doc and format(rho, ".3f") in text_of(doc)


def test_prune_file_page(results, tmp_path):
    doc, d = page(results, "edits", tmp_path)
    text = text_of(doc)
    assert "Pruning" in text and format(d["base_ppl"], ".4g") in text
    for e in d["edits"]:
        assert pm(e["ratio"], e["ratio_se"]) in text and pm(e["nll_delta"], e["nll_delta_se"]) in text


def test_sensitivity_page_has_a_layer_by_tensor_heatmap(results, tmp_path):
    doc, d = page(results, "sensitivity", tmp_path)
    text = text_of(doc)
    assert d["granularity"] == "tensor" and d["model"]["sha256"] in text
    for r in d["rows"]:
        assert pm(r["kld"], r["kld_se"]) in text, r["group"]["name"]
    assert "KLD per layer and tensor" in doc
    # one heatmap cell per layer tensor, its tooltip naming the tensor and its KLD
    titles = [html.unescape(t) for t in re.findall(r"<title>([^<]*)</title>", doc)]
    layer_rows = [r for r in d["rows"] if r["group"]["name"].startswith("blk.")]
    for r in layer_rows:
        tip = f"{r['group']['name']} at Q4_0: KLD {pm(r['kld'], r['kld_se'])}"
        assert sum(t.startswith(tip) for t in titles) == 2  # its bar and its heatmap cell


def test_plan_page_has_the_chart_the_recipe_and_the_command(results, tmp_path):
    doc, d = page(results, "plan", tmp_path)
    text = text_of(doc)
    for m in [d["plan"], *d["uniform"]]:
        assert m["label"] in text and pm(m["kld"], m["kld_se"]) in text
    assert pm(d["plan"]["predicted_kld"], d["plan"]["predicted_kld_se"]) in text
    command = "llama-quantize " + " ".join(shlex.quote(a) for a in d["llama_quantize"])
    assert html.escape(command) in doc
    # the plan's own overrides, or (a preset fitting the budget measured better) that preset itself
    assert "--tensor-type" in command or d["fallback"]["label"].lower() == command.split()[-1]
    for g in d["groups"]:
        assert g["group"] in text and g["type"] in text
    # plan.json names no model: the header takes it from the sensitivity files beside it
    sens = json.loads(next(results["plan"].glob("sensitivity-*.json")).read_text())
    assert sens["model"]["sha256"] in text


def test_plan_page_draws_measured_presets_beside_uniform_types(results, tmp_path):
    """A plan.json with llama-quantize's presets measured (a "presets" list shaped as "uniform")."""
    folder = tmp_path / "plan"
    shutil.copytree(results["plan"], folder)
    d = json.loads((folder / "plan.json").read_text())
    preset = {**d["uniform"][0], "label": "Q4_K_M", "kld": 0.012345, "kld_se": 0.000678}
    (folder / "plan.json").write_text(json.dumps({**d, "presets": [preset]}))
    doc = write_report([folder], tmp_path / "p.html").read_text()
    assert "llama-quantize presets" in doc and "Q4_K_M" in text_of(doc) and pm(0.012345, 0.000678) in text_of(doc)
    # the Pareto frontier of the presets and uniform types, and a fallback said in words
    fallback = {"label": "Q4_K_M", "kld": 0.012345, "kld_se": 0.000678, "plan_kld": 0.5, "bytes": preset["bytes"]}
    (folder / "plan.json").write_text(json.dumps({**d, "presets": [preset], "frontier": ["Q4_K_M"],
                                                  "target_preset": "Q4_K_M", "fallback": fallback}))
    text = text_of(write_report([folder], tmp_path / "f.html").read_text())
    assert "Pareto frontier" in text and "Fallback: Q4_K_M fits the budget" in text and "the size of Q4_K_M" in text


def test_compare_page_has_the_statistics_and_the_answers_marked(results, tmp_path):
    doc, d = page(results, "compare", tmp_path)
    text = text_of(doc)
    s = d["statistics"]
    assert f"{s['kld']:.6f} ± {s['kld_se']:.6f}" in text
    assert f"{100 * s['same_top']:.3f}% ± {100 * s['same_top_se']:.3f}%" in text
    for label, v in s["kld_quantiles"].items():
        assert f"{label} KLD" in text and f"{v:.6f}" in text
    for a in d["generations"]["prompts"]:
        assert a["prompt"] in text
        if a["diverges_at"] is not None and a["base_text"].startswith(a["common_text"]):
            rest = a["base_text"][len(a["common_text"]):]
            assert f'{html.escape(a["common_text"])}<mark class="diff">▶{html.escape(rest)}' in doc


def test_noise_page_has_every_sigma_and_depth(results, tmp_path):
    doc, d = page(results, "noise", tmp_path)
    text = text_of(doc)
    for s in d["embedding"]["sigmas"]:
        assert pm(s["kl"]["mean"], s["kl"]["se"]) in text and pm(s["flip_pct"], s["flip_pct_se"]) in text
        for x in s["layers"]:
            assert pm(x["rel"], x["rel_se"]) in text
    t = d["typos"]
    assert pm(t["kl"]["mean"], t["kl"]["se"]) in text
    for p in t["prompts"]:
        assert p["prompt"] in text


def test_several_results_side_by_side(results, tmp_path):
    out = write_report([results["study"], results["noise"], results["compare"]], tmp_path / "all.html")
    doc = out.read_text(encoding="utf-8")
    assert doc.count("<article ") == 3 and "3 results side by side" in doc
    assert len(set(re.findall(r'<g id="([^"]+)"><title>', doc))) == len(re.findall(r'<g id="[^"]+"><title>', doc))


def test_log_scale_where_scores_span_decades_and_missing_scores(tmp_path, results):
    d = data_of(results["scores"])
    d["methods"] = {"layer_ablation": {**d["methods"]["layer_ablation"], "scores": [0.02, 0.3, None, 4.0, 90.0],
                                       "uncertainty": [0.001, 0.01, None, 0.2, 3.0], "ranking": [0, 1, 3, 4, 2]},
                    "weight_norm": {**d["methods"]["weight_norm"], "scores": [1.0, 1.1, 1.2, 1.3, 1.4],
                                    "uncertainty": [None] * 5, "ranking": [0, 1, 2, 3, 4]}}
    path = tmp_path / "handmade.json"
    path.write_text(json.dumps(d))
    doc = write_report([path], None).read_text(encoding="utf-8")
    assert (tmp_path / "handmade.html").exists()
    text = text_of(doc)
    assert "layer_ablation (log scale)" in text and "weight_norm (log scale)" not in text
    assert "90 ± 3" in text and "0.02 ± 0.001" in text and "—" in text


def test_report_beside_a_results_file(results, tmp_path):
    assert write_report_beside(results["study"] / "study.json") == results["study"] / "report.html"
    assert write_report_beside(results["noise"] / "noise.json") == results["noise"] / "noise.html"
    assert (results["noise"] / "noise.html").read_text().startswith("<!DOCTYPE html>")


def test_cli_report_prints_the_page_path(results, tmp_path, capsys):
    out = tmp_path / "r.html"
    code, stdout, err = run(capsys, "report", results["edits"], results["scores"], "--output", out)
    assert code == 0, err
    assert stdout.strip() == str(out) and out.read_text().count("<article ") == 2


def test_detect_kind_rejects_what_is_not_a_result():
    assert detect_kind([1, 2]) is None and detect_kind({"schema": "other"}) is None
    assert detect_kind({"model": {}, "text": {}}) is None


@pytest.mark.parametrize("content, needle", [
    ("not json at all", "not a q-psa result (not JSON"),
    ('{"hello": 1}', "not a q-psa result"),
    ("[1, 2, 3]", "not a q-psa result"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_bad_inputs_are_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_user_error(*run(capsys, "report", path)[::2], str(path), needle)


def test_missing_empty_and_malformed_inputs(results, tmp_path, capsys):
    assert_user_error(*run(capsys, "report", tmp_path / "nope.json")[::2], "no such results file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(*run(capsys, "report", empty)[::2], "no q-psa results in this folder")
    broken = data_of(results["study"])
    del broken["prune"]["edits"][0]["ratio"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert_user_error(*run(capsys, "report", path)[::2], "a study results file, but unreadable", "ratio")
    assert_user_error(*run(capsys, "report", results["edits"], "--output", tmp_path / "r.txt")[::2], ".html")
    assert_user_error(*run(capsys, "report", results["edits"], "--output", tmp_path)[::2], "is a folder")
    with pytest.raises(QpsaError, match="at least one"):
        write_report([], None)
