"""The study's files: study.json, scores.json/.csv (readable by prune and loop), results.md and its
plots, rendered from a finished `qpsa.experiments.study.StudyResult`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qpsa.edits.pruning import EditReport
from qpsa.experiments.study import StudyResult
from qpsa.fsutil import write_atomic
from qpsa.report import plots
from qpsa.report.html import write_report_beside
from qpsa.scores.results import ScoreRun


def write_study(result: StudyResult, out_dir: Path) -> list[Path]:
    """results.md, study.json, scores.json/.csv (readable by prune/loop), four PNG plots and report.html
    (the report comes last: the list's last path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(result.model["name"]).name
    write_atomic(out_dir / "study.json", json.dumps(result.to_dict(), indent=1))
    result.scores.save(out_dir / "scores.json")
    plots.layer_scores(out_dir / "scores.png", result.scores.methods, f"Layer importance, {name}")
    plots.ratio_vs_k(out_dir / "prune.png", result.prune.edits, f"Pruning the K least important layers, {name}",
                     "PPL ratio (held-out)")
    plots.ratio_vs_k(out_dir / "loop.png", result.loop.edits, f"Repeating the K most important layers, {name}",
                     "PPL ratio (held-out)")
    names = sorted(result.scores.methods)
    rho = {(r["a"], r["b"]): r["spearman"] for r in result.agreement}
    matrix = [[1.0 if a == b else rho.get((a, b), rho.get((b, a), math.nan)) for b in names] for a in names]
    plots.agreement_heatmap(out_dir / "agreement.png", names, matrix, f"Rank agreement, {name}")
    write_atomic(out_dir / "results.md", results_markdown(result))
    report = write_report_beside(out_dir / "study.json")
    return [out_dir / f for f in ("results.md", "study.json", "scores.json", "scores.png", "prune.png", "loop.png",
                                  "agreement.png")] + [report]


def _qpsa_setup(q: dict) -> str:
    if not q:
        return ""
    return (f"Q-PSA: {q['estimator']} estimator, N = {q['samples_per_matrix']} weights per matrix, "
            f"K = {q['probes']} {q.get('probe_scope', 'matrix')}-scope probes, unit {q['unit']}, {q['precision']}.")


def results_markdown(r: StudyResult) -> str:
    s = r.scores
    lines = [f"# Q-PSA study: {r.model['name']}", "",
             f"Model `{Path(r.model['path']).name}` ({r.model['architecture']}, {r.model['n_layer']} layers, "
             f"sha256 `{r.model['sha256'][:16]}…`). Text {s.text['name']} (sha256 `{s.text['sha256'][:16]}…`): "
             f"rankings on tokens {s.text['start_token']}… ({s.text['n_tokens']} tokens), validation on the held-out "
             f"span starting at token {r.prune.eval_text['start_token']} ({r.prune.eval_text['n_tokens']} tokens). "
             f"Base PPL {s.base['ppl']:.4f} (ranking span), {r.prune.base_ppl:.4f} (held-out span). "
             f"Total time {r.seconds / 60:.1f} min; one forward pass = {r.forward_seconds:.3f} s. "
             + _qpsa_setup(r.scores.settings.get("qpsa", {})), "",
             "## Pruning: PPL ratio when the K least important layers are removed", "",
             _edit_table(r.prune), "", "![pruning](prune.png)", "",
             "## Looping: PPL ratio when each of the K most important layers runs twice", "",
             _edit_table(r.loop), "", "![looping](loop.png)", "",
             "## Layer scores (higher = more important; ± one standard error)", "", _score_table(s), "",
             "![scores](scores.png)", "",
             "## Rank agreement (Spearman ρ / Kendall τ between layer scores)", "",
             "| a | b | Spearman ρ | p | Kendall τ | p |", "|---|---|---|---|---|---|"]
    for a in r.agreement:
        lines.append(f"| {a['a']} | {a['b']} | {a['spearman']:.3f} | {a['spearman_p']:.2g} | {a['kendall']:.3f} | "
                     f"{a['kendall_p']:.2g} |")
    lines += ["", "![agreement](agreement.png)", "", "## Q-PSA convergence over N (probe estimator)", "",
              "| N | against N | layers compared | Spearman ρ | p |", "|---|---|---|---|---|"]
    for c in r.convergence:
        lines.append(f"| {c['n']} | {c['against_n']} | {len(c['layers'])}: {', '.join(map(str, c['layers']))} | "
                     f"{c['spearman']:.3f} | {c['p']:.2g} |")
    lines += ["", "## Cost of each method", "", "| method | seconds | forward-pass equivalents |", "|---|---|---|"]
    for m, c in r.cost.items():
        lines.append(f"| {m} | {c['seconds']:.1f} | {c['forward_equivalents']:.1f} |")
    lines += ["", "Ratios are exp(mean ΔNLL) over the held-out tokens; ± is one standard error from paired "
              "per-token differences, which treats the tokens of one window as independent and so understates "
              "the uncertainty.", ""]
    return "\n".join(lines)


def _edit_table(report: EditReport) -> str:
    ks = sorted({e.k for e in report.edits})
    cells = {(e.method, e.k): e for e in report.edits}
    rows = ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in dict.fromkeys(e.method for e in report.edits):
        rows.append(f"| {m} | " + " | ".join(
            f"{_fmt(cells[(m, k)].ratio)}× ± {_fmt(cells[(m, k)].ratio_se)} (layers {','.join(map(str, cells[(m, k)].layers))})"
            for k in ks) + " |")
    return "\n".join(rows)


def _score_table(run: ScoreRun) -> str:
    names = list(run.methods)
    n = len(next(iter(run.methods.values())).scores)
    rows = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(n):
        cells = []
        for m in names:
            s, u = run.methods[m].scores[i], run.methods[m].uncertainty[i]
            cells.append("-" if s is None else f"{s:.4g}" + (f" ± {u:.2g}" if u is not None else ""))
        rows.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"
