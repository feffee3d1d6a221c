"""Console rendering of layer-importance results: scores ± uncertainty, rankings, rank agreement.

Computes nothing but number formats: each method's column gets one format chosen from its largest
magnitude, so the decimal points and the "±" signs line up down the column.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from qpsa.scores.base import LayerScores


def _finite(values) -> list[float]:
    return [abs(v) for v in values if v is not None and math.isfinite(v)]


def number_format(values) -> str:
    """A format spec for a column: fixed point with 4 significant digits at the column's median
    magnitude (larger values just get more integer digits), integers as integers, scientific
    where fixed point would be unreadable."""
    finite = _finite(values)
    big = max(finite, default=0.0)
    if finite and all(v == int(v) for v in finite) and big < 1e7:
        return ".0f"
    nonzero = sorted(v for v in finite if v > 0)
    if not nonzero:
        return ".4f"
    if big >= 1e7 or big < 1e-4:
        return ".3e"
    typical = nonzero[len(nonzero) // 2]
    return f".{min(6, max(0, 3 - math.floor(math.log10(typical))))}f"


def _fmt(v, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def score_cells(s: LayerScores) -> list[str]:
    """'score ± se' per layer, padded so both parts align within the column."""
    spec = number_format(list(s.scores))
    scores = [_fmt(v, spec) for v in s.scores]
    if all(u is None for u in s.uncertainty):
        width = max(map(len, scores), default=0)
        return [x.rjust(width) for x in scores]
    unc_spec = number_format([u for u in s.uncertainty if u is not None] + list(s.scores))
    uncs = [_fmt(u, unc_spec) for u in s.uncertainty]
    w1, w2 = max(map(len, scores), default=0), max(map(len, uncs), default=0)
    return [f"{a.rjust(w1)} ± {b.rjust(w2)}" for a, b in zip(scores, uncs)]


def scores_table(console: Console, methods: dict[str, LayerScores], title: str = "Layer scores") -> None:
    """One row per layer, one column per method: score ± standard error (no ± where a method has
    none). Methods that do not fit the console's width side by side go into a second table."""
    n_layer = max((len(s.scores) for s in methods.values()), default=0)
    cells = {name: score_cells(s) for name, s in methods.items()}
    groups, width = [[]], 8
    for name, col in cells.items():
        w = max([len(name), *map(len, col)]) + 3
        if groups[-1] and width + w > console.width:
            groups.append([])
            width = 8
        groups[-1].append(name)
        width += w
    for k, group in enumerate(groups):
        suffix = f" ({k + 1}/{len(groups)})" if len(groups) > 1 else ""
        table = Table(title=f"{title}, higher = more important{suffix}", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("layer", justify="right")
        for name in group:
            table.add_column(name, justify="right", no_wrap=True)
        for i in range(n_layer):
            table.add_row(str(i), *(cells[name][i] if i < len(cells[name]) else "" for name in group))
        console.print(table)
    for name, s in methods.items():
        console.print(f"  {name}: {s.unit}", highlight=False)


def rankings_table(console: Console, methods: dict[str, LayerScores]) -> None:
    """Each method's ranking, least important layer first."""
    table = Table(title="Rankings (layers, least important first)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("method", no_wrap=True)
    table.add_column("least → most important", overflow="fold")
    table.add_column("seconds", justify="right")
    for name, s in methods.items():
        table.add_row(name, " ".join(map(str, s.ranking())), f"{s.seconds:.1f}")
    console.print(table)


def agreement_table(console: Console, rows: list[dict], title: str = "Rank agreement") -> None:
    """Spearman ρ and Kendall τ (with p-values) for every pair of methods."""
    if not rows:
        console.print(f"{title}: needs at least two methods")
        return
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("method a", "left"), ("method b", "left"), ("Spearman ρ", "right"), ("p", "right"),
                         ("Kendall τ", "right"), ("p", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(r["a"], r["b"], f"{r['spearman']:+.3f}", _p(r["spearman_p"]), f"{r['kendall']:+.3f}",
                      _p(r["kendall_p"]))
    console.print(table)


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "nan"
    if p == 0:
        return "0"
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


def baseline_report(console: Console, run, agreement: list[dict], out: str | None = None) -> None:
    """Everything `q-psa baseline` prints after the run: scores, rankings, agreement, where it was saved."""
    scores_table(console, run.methods)
    rankings_table(console, run.methods)
    agreement_table(console, agreement)
    if out is not None:
        from pathlib import Path

        console.print(f"wrote {out} and {Path(out).with_suffix('.csv')}  ({run.seconds:.1f} s in all)")
