"""The original Q-PSA experiment in one run: every ranking method, then the rankings validated by
pruning and looping on held-out tokens, with rank agreement, Q-PSA's convergence over N, and the
cost of every method.

    result = run_study(loaded, text, StudyPlan.default())     # or StudyPlan.quick()
    write_study(result, Path("study-smollm2"))                 # results.md, study.json, PNG plots

Cost is reported in forward-pass equivalents: a method's wall time divided by the time of one
full forward pass over the same evaluation tokens, measured in the same run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qpsa.edits.pruning import (
    EditReport,
    HeldOutEvaluator,
    loop_candidates,
    prune_candidates,
    repeating,
    without,
)
from qpsa.model.load import LoadedModel
from qpsa.scores.base import LayerScores, ScoreSettings, eval_tokens
from qpsa.scores.qpsa.settings import DEFAULT_PROBES
from qpsa.scores.results import ScoreRun, rank_agreement
from qpsa.sources.texts import EvalText

BASELINE_METHODS = ("layer_ablation", "weight_norm", "random", "block_influence", "angular_distance", "fisher")


@dataclass(frozen=True)
class StudyPlan:
    max_tokens: int = 500  # the original study's evaluation length; the held-out span has as many
    samples_per_matrix: int = 100  # Q-PSA's N, as in the original study
    probes: int = DEFAULT_PROBES["layer"]  # layer-scope probes per layer, as `q-psa score --estimator probe`
    convergence_n: tuple[int, ...] = (25, 50)  # smaller N, each ranked against the main N …
    convergence_every: int = 3  # … on every third layer (0, 3, 6, …), to keep the study's cost down
    prune_k: tuple[int, ...] = (1, 2, 4, 8)
    loop_k: tuple[int, ...] = (1, 2, 4)
    seed: int = 42

    @classmethod
    def quick(cls) -> StudyPlan:
        return cls(max_tokens=256, samples_per_matrix=25, probes=4, convergence_n=(10,), prune_k=(1, 2, 4),
                   loop_k=(1, 2))


@dataclass
class StudyResult:
    model: dict
    plan: dict
    scores: ScoreRun
    prune: EditReport
    loop: EditReport
    agreement: list[dict]
    convergence: list[dict]
    forward_seconds: float  # one full forward over the evaluation tokens
    cost: dict[str, dict] = field(default_factory=dict)  # method -> seconds, forward-pass equivalents
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "plan": self.plan, "scores": self.scores.to_dict(),
                "prune": self.prune.to_dict(), "loop": self.loop.to_dict(), "agreement": self.agreement,
                "convergence": self.convergence, "forward_seconds": self.forward_seconds, "cost": self.cost,
                "seconds": self.seconds}


def forward_seconds(loaded: LoadedModel, tokens: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one full forward (logits at every position) over the tokens."""
    times = []
    with torch.inference_mode():
        loaded.model.forward(tokens)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            loaded.model.forward(tokens)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_study(loaded: LoadedModel, text: EvalText, plan: StudyPlan, bar=None, log=print) -> StudyResult:
    """`bar(label, total)` is a context manager yielding `advance(status)` (a progress bar)."""
    from contextlib import nullcontext

    from scipy.stats import spearmanr

    from qpsa.scores.baselines import run_baselines
    from qpsa.scores.qpsa.run import score_qpsa
    from qpsa.scores.qpsa.settings import QpsaSettings

    start = time.perf_counter()
    n_layer = loaded.config.n_layer
    open_bar = bar or (lambda label, total: nullcontext(lambda status="": None))
    tokens = eval_tokens(loaded, text, plan.max_tokens)
    held_out = eval_tokens(loaded, text, plan.max_tokens, span="held-out")
    unit = forward_seconds(loaded, tokens.tokens)
    log(f"one forward over {tokens.tokens.shape[1]} tokens: {unit:.3f} s (the cost unit)")

    run = run_baselines(loaded, tokens, list(BASELINE_METHODS), ScoreSettings(plan.seed, plan.max_tokens), bar=bar)
    run.command = "study"

    def qpsa_at(n: int, layers: list[int]) -> LayerScores:
        settings = QpsaSettings(samples_per_matrix=n, seed=plan.seed, max_tokens=plan.max_tokens,
                                estimator="probe", probes=plan.probes, probe_scope="layer")
        with open_bar(f"qpsa N={n}", len(layers)) as advance:
            return score_qpsa(loaded, tokens, settings, layers=layers, progress=advance, noise_floor=False).scores

    main = qpsa_at(plan.samples_per_matrix, list(range(n_layer)))
    run.methods["qpsa"] = main
    run.settings["qpsa"] = {"estimator": "probe", "samples_per_matrix": plan.samples_per_matrix,
                            "probes": plan.probes, "probe_scope": "layer", "unit": "weight", "precision": "float32"}
    convergence = []
    subset = list(range(0, n_layer, plan.convergence_every))
    for n in plan.convergence_n:
        smaller = qpsa_at(n, subset)
        both = [i for i in subset if smaller.scores[i] is not None and main.scores[i] is not None]
        rho, p = spearmanr([smaller.scores[i] for i in both], [main.scores[i] for i in both])
        convergence.append({"n": n, "against_n": plan.samples_per_matrix, "layers": subset, "spearman": float(rho),
                            "p": float(p), "seconds": smaller.seconds, "scores": smaller.scores})
        log(f"Q-PSA N={n} vs N={plan.samples_per_matrix}: Spearman ρ = {rho:.3f} (p = {p:.2g})")

    evaluator = HeldOutEvaluator(loaded, held_out)
    settings = {"model_sha256": loaded.file.sha256, "rankings": "this study"}
    prune = EditReport("prune", evaluator.base_ppl, held_out.describe(), settings=dict(settings, ks=list(plan.prune_k)))
    loop = EditReport("loop", evaluator.base_ppl, held_out.describe(), settings=dict(settings, ks=list(plan.loop_k), repeat=1))
    methods = list(run.methods)
    for report, ks, candidates, layer_order in ((prune, plan.prune_k, prune_candidates, without),
                                                (loop, plan.loop_k, loop_candidates, repeating)):
        with open_bar(report.kind, len(methods) * len(ks)) as advance:
            for m in methods:
                for k in ks:
                    chosen = candidates(run.methods[m], k, n_layer)
                    report.edits.append(evaluator.edit(m, k, chosen, layer_order(n_layer, chosen)))
                    advance(f"{m} K={k}")

    prune.seconds = sum(e.seconds for e in prune.edits)
    loop.seconds = sum(e.seconds for e in loop.edits)
    cost = {m: {"seconds": s.seconds, "forward_equivalents": s.seconds / unit} for m, s in run.methods.items()}
    return StudyResult(
        model={"name": loaded.name, "path": str(loaded.path), "sha256": loaded.file.sha256,
               "architecture": loaded.config.arch, "n_layer": n_layer},
        plan=asdict(plan), scores=run, prune=prune, loop=loop, agreement=rank_agreement(run.methods),
        convergence=convergence, forward_seconds=unit, cost=cost, seconds=time.perf_counter() - start)


def write_study(result: StudyResult, out_dir: Path) -> list[Path]:
    """results.md, study.json, scores.json/.csv (readable by prune/loop), and four PNG plots."""
    from qpsa.fsutil import write_atomic
    from qpsa.report import plots

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
    return [out_dir / f for f in ("results.md", "study.json", "scores.json", "scores.png", "prune.png", "loop.png",
                                  "agreement.png")]


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
