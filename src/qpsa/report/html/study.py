"""Sections for layer-importance results: a study, a scores file (baseline/score), a prune/loop file.

Shows the file's numbers as they are; the one thing computed here is the rank agreement of a
scores file with several methods (Spearman ρ and Kendall τ by scipy, as `q-psa agreement`
computes them), since only a study stores it.
"""

from __future__ import annotations

import math
from html import escape

from qpsa.report.html import charts
from qpsa.report.html.load import Result
from qpsa.report.html.tables import cell, num, pm, table, value_cell

SE_NOTE = "± is one standard error"


def section(sid: str, title: str, body: str, what: str = "") -> str:
    return (f'<section id="{sid}"><h3>{escape(title)}</h3>' + (f'<p class="what">{what}</p>' if what else "")
            + body + "</section>")


def study_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    """(title, html) per section of a study."""
    d = r.data
    s = d["scores"]
    prune, loop = d["prune"], d["loop"]
    q = s.get("settings", {}).get("qpsa") or {}
    qpsa_setup = (f" Q-PSA: {q.get('estimator')} estimator, N = {q.get('samples_per_matrix')} weights per matrix, "
                  f"K = {q.get('probes')} {q.get('probe_scope', 'matrix')}-scope probes, unit {q.get('unit')}, "
                  f"{q.get('precision')}." if q else "")
    summary = (f"<p>Base PPL {num(s['base']['ppl'])} on the ranking span ({s['text'].get('n_tokens')} tokens from "
               f"token {s['text'].get('start_token')}), {num(prune['base_ppl'])} on the held-out span "
               f"({prune['eval_text'].get('n_tokens')} tokens from token {prune['eval_text'].get('start_token')}), "
               f"which validates the rankings by pruning and looping. Total time {d['seconds'] / 60:.1f} min; one "
               f"forward pass over the evaluation tokens = {d['forward_seconds']:.3f} s, the unit of cost below."
               f"{escape(qpsa_setup)}</p>")
    out = [("Summary", section(f"{prefix}-summary", "Summary", summary))]
    out.append(("Layer scores", score_section(s["methods"], f"{prefix}-scores")))
    out.append(("Pruning", edit_section(prune, f"{prefix}-prune")))
    out.append(("Looping", edit_section(loop, f"{prefix}-loop")))
    out.append(("Rank agreement", agreement_section(d["agreement"], f"{prefix}-agreement")))
    if d.get("convergence"):
        out.append(("Q-PSA convergence", convergence_section(d["convergence"], f"{prefix}-convergence")))
    if d.get("cost"):
        out.append(("Cost", cost_section(d["cost"], f"{prefix}-cost")))
    return out


def scores_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    d = r.data
    methods = d["methods"]
    base = d.get("base") or {}
    summary = (f"<p>{len(methods)} method(s) on {d['text'].get('n_tokens')} tokens; the unmodified model's PPL on "
               f"them is {num(base.get('ppl'))} (mean NLL {num(base.get('nll'))} nats).</p>")
    out = [("Summary", section(f"{prefix}-summary", "Summary", summary)),
           ("Layer scores", score_section(methods, f"{prefix}-scores"))]
    if len(methods) > 1:
        out.append(("Rank agreement", agreement_section(_agreement(methods), f"{prefix}-agreement",
                                                        computed_here=True)))
    return out


def edits_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    title = "Pruning" if r.data.get("kind") == "prune" else "Looping"
    return [(title, edit_section(r.data, f"{prefix}-{r.data.get('kind')}"))]


def score_section(methods: dict, sid: str) -> str:
    """Per method: a bar per layer with ± its standard error; one table of every score."""
    names = list(methods)
    n = max(len(m["scores"]) for m in methods.values())
    figures = []
    for name in names:
        m = methods[name]
        rank = {layer: k for k, layer in enumerate(m.get("ranking") or [])}
        tips = [f"{name}, layer {i}: {pm(v, u)} ({m.get('unit')}); rank {rank.get(i, '?')} of {n}, "
                f"0 = least important" for i, (v, u) in enumerate(zip(m["scores"], m["uncertainty"]))]
        figures.append(charts.layer_bars(name, _short(m.get("unit", "")), m["scores"], m["uncertainty"], tips))
    units = "".join(f"<li><b>{escape(k)}</b>: {escape(str(m.get('unit')))}"
                    f"{'' if any(u is not None for u in m['uncertainty']) else ' (no uncertainty: exact)'}; "
                    f"took {num(m.get('seconds'), '.3g')} s</li>" for k, m in methods.items())
    rows = []
    for i in range(n):
        row = [cell(i, i)]
        for name in names:
            m = methods[name]
            v = m["scores"][i] if i < len(m["scores"]) else None
            u = m["uncertainty"][i] if i < len(m["uncertainty"]) else None
            row.append(value_cell(v, u, what=f"{name}, layer {i}: {m.get('unit')}"))
        rows.append(row)
    what = (f"Higher = more important. {SE_NOTE} where the method has one; a log scale is used where a method's "
            "scores span two decades or more. Hover a bar for its value; click a column header to sort.")
    body = (f'<ul class="units">{units}</ul><div class="charts">{"".join(figures)}</div>'
            + table(["layer", *names], rows, caption="Layer scores (value ± one standard error)"))
    return section(sid, "Layer scores", body, what)


def edit_section(report: dict, sid: str) -> str:
    """PPL ratio against K per ranking method, with ± one standard error, and every edit in a table."""
    prune = report.get("kind") == "prune"
    edits = report["edits"]
    series = []
    for method in dict.fromkeys(e["method"] for e in edits):
        rows = sorted((e for e in edits if e["method"] == method), key=lambda e: e["k"])
        series.append(charts.Series(method, [e["k"] for e in rows], [e["ratio"] for e in rows],
                                    [e["ratio_se"] for e in rows],
                                    [f"{method}, K = {e['k']} ({'removed' if prune else 'repeated'} layers "
                                     f"{', '.join(map(str, e['layers']))}): PPL ratio {pm(e['ratio'], e['ratio_se'])}, "
                                     f"PPL {num(e['ppl'])}" for e in rows]))
    what_k = "the K least important layers removed" if prune else "each of the K most important layers run again"
    chart = charts.curves(f"{'Pruning' if prune else 'Looping'}: PPL ratio with {what_k}", "K (layers)",
                          "PPL ratio (held-out)", series, log_y=True, hline=1.0, integer_x=True)
    rows = [[cell(e["method"]), cell(e["k"], e["k"]), cell(", ".join(map(str, e["layers"]))),
             value_cell(e["ppl"]), value_cell(e["ratio"], e["ratio_se"], what="PPL ratio, edited / unedited"),
             value_cell(e["nll_delta"], e["nll_delta_se"], what="mean ΔNLL per token, nats")] for e in edits]
    what = (f"Base PPL {num(report['base_ppl'])} on the held-out span ({report['eval_text'].get('n_tokens')} tokens "
            f"from token {report['eval_text'].get('start_token')}). Ratio = exp(mean ΔNLL); {SE_NOTE} from paired "
            "per-token differences, which treats the tokens of one window as independent and so understates it.")
    body = (f'<div class="charts one">{chart}</div>'
            + table(["method", "K", "layers", "PPL", "PPL ratio", "ΔNLL (nats)"], rows))
    return section(sid, "Pruning" if prune else "Looping", body, what)


def agreement_section(rows: list[dict], sid: str, computed_here: bool = False) -> str:
    names = sorted({r["a"] for r in rows} | {r["b"] for r in rows})
    by_pair = {}
    for r in rows:
        by_pair[(r["a"], r["b"])] = by_pair[(r["b"], r["a"])] = r
    matrix, tips = [], []
    for a in names:
        matrix.append([1.0 if a == b else by_pair.get((a, b), {}).get("spearman") for b in names])
        tips.append([f"{a} vs {b}: " + ("the same method" if a == b else _rho_tip(by_pair.get((a, b))))
                     for b in names])
    chart = charts.heatmap("Rank agreement (Spearman ρ)", names, names, matrix, tips, "Spearman ρ", -1.0, 1.0,
                           "RdBu_r", annotate=len(names) <= 12)
    trows = [[cell(r["a"]), cell(r["b"]), cell(r.get("n_layers", "—"), r.get("n_layers")),
              value_cell(r["spearman"], spec=".3f"), value_cell(r["spearman_p"], spec=".2g"),
              value_cell(r["kendall"], spec=".3f"), value_cell(r["kendall_p"], spec=".2g")] for r in rows]
    what = ("Spearman ρ and Kendall τ between the layer scores of every pair of methods, over the layers both "
            "score; p is the probability of so strong an agreement between unrelated rankings."
            + (" Computed here from the file's scores (scipy), as `q-psa agreement` does." if computed_here else ""))
    body = f'<div class="charts one">{chart}</div>' + table(["a", "b", "layers", "Spearman ρ", "p", "Kendall τ", "p"],
                                                            trows)
    return section(sid, "Rank agreement", body, what)


def convergence_section(rows: list[dict], sid: str) -> str:
    trows = [[cell(c["n"], c["n"]), cell(c["against_n"], c["against_n"]),
              cell(f"{len(c['layers'])}: {', '.join(map(str, c['layers']))}"), value_cell(c["spearman"], spec=".3f"),
              value_cell(c["p"], spec=".2g"), value_cell(c["seconds"], spec=".3g")] for c in rows]
    what = "Q-PSA with fewer sampled weights per matrix (N), ranked against the main N on a subset of layers."
    return section(sid, "Q-PSA convergence over N", table(["N", "against N", "layers compared", "Spearman ρ", "p",
                                                           "seconds"], trows), what)


def cost_section(cost: dict, sid: str) -> str:
    trows = [[cell(m), value_cell(c["seconds"], spec=".3g"), value_cell(c["forward_equivalents"], spec=".1f")]
             for m, c in cost.items()]
    what = "Wall time of each method, and the same in forward-pass equivalents (seconds / one full forward pass)."
    return section(sid, "Cost of each method", table(["method", "seconds", "forward-pass equivalents"], trows), what)


def _rho_tip(r: dict | None) -> str:
    if not r:
        return "not compared"
    return (f"Spearman ρ = {num(r['spearman'], '.3f')} (p = {num(r['spearman_p'], '.2g')}), Kendall τ = "
            f"{num(r['kendall'], '.3f')} (p = {num(r['kendall_p'], '.2g')}) over {r.get('n_layers', '?')} layers")


def _agreement(methods: dict) -> list[dict]:
    from itertools import combinations

    from scipy.stats import kendalltau, spearmanr

    rows = []
    for a, b in combinations(sorted(methods), 2):
        pairs = [(x, y) for x, y in zip(methods[a]["scores"], methods[b]["scores"]) if _ok(x) and _ok(y)]
        row = {"a": a, "b": b, "n_layers": len(pairs), "spearman": math.nan, "spearman_p": math.nan,
               "kendall": math.nan, "kendall_p": math.nan}
        if len(pairs) >= 3:
            x, y = zip(*pairs)
            row["spearman"], row["spearman_p"] = map(float, spearmanr(x, y))
            row["kendall"], row["kendall_p"] = map(float, kendalltau(x, y))
        rows.append(row)
    return rows


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _short(unit: str) -> str:
    """An axis label from a unit sentence: its first clause, at most ~40 characters."""
    text = unit.split(";")[0].split(" (")[0]
    return text if len(text) <= 40 else text[:38] + "…"
