"""Console rendering of a `q-psa score` run (computes nothing beyond ranks and a display scale)."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

SHORT = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
         "ffn_down": "down", "ffn_gate_inp": "router", "ffn_gate_exps": "gate×E", "ffn_up_exps": "up×E",
         "ffn_down_exps": "down×E"}


def _scale(values) -> int:
    """A power of ten E such that the largest |value| / 10**E lies in [1, 10)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    return math.floor(math.log10(max(finite))) if finite else 0


def _fmt(x, e: int) -> str:
    """x / 10**e with 3 decimals (every value shown is below 10 in that unit; the JSON has them all)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x / 10**e:.3f}"


def _list(layers: list[int]) -> str:
    return ", ".join(map(str, layers))


def qpsa_report(console: Console, run) -> None:
    s = run.methods["qpsa"]
    d = s.details
    layers = d["layers"]
    per_matrix = d.get("per_matrix") or {}
    matrices = d["matrices"] if per_matrix else []  # layer-scope probes have no per-matrix breakdown
    order = [i for i in reversed(s.ranking()) if s.scores[i] is not None]  # most important first
    rank = {layer: r + 1 for r, layer in enumerate(order)}
    e = _scale([d["per_layer"][str(i)]["score"] for i in layers]
               + [per_matrix[str(i)][m]["mean"] for i in layers for m in matrices])
    unit = f"×1e{e}" if e else ""
    title = (f"Q-PSA per layer: {d['estimator']} estimator, unit {d['unit']}, {d['precision']}, "
             f"N={d['samples_per_matrix']}/matrix"
             + (f", K={d['probes']} probes per {d.get('probe_scope', 'matrix')}" if d.get("probes") else ""))
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False,
                  caption=f"values {unit or 'as is'}: ½(ΔPPL(+)+ΔPPL(−)) per {d['unit']} moved; score = "
                          + (f"mean of the {len(matrices)} matrix columns" if matrices else "mean over units moved in all "
                             f"{len(d['matrices'])} matrices at once (layer-scope probes)") + "; rank 1 = most important")
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("score±se", justify="right", no_wrap=True, min_width=10)
    table.add_column("rank", justify="right", no_wrap=True)
    for m in matrices:
        table.add_column(SHORT.get(m, m), justify="right", no_wrap=True, min_width=6)
    table.add_column("<floor", justify="right", no_wrap=True, min_width=6)
    for i in layers:
        pl, pm = d["per_layer"][str(i)], per_matrix.get(str(i), {})
        below = pl.get("below_floor")
        se = "" if pl["se"] is None else f"±{_fmt(pl['se'], e)}"
        table.add_row(str(i), _fmt(pl["score"], e) + se, str(rank.get(i, "-")),
                      *(_fmt(pm[m]["mean"], e) for m in matrices), "-" if below is None else f"{below:.0%}")
    console.print(table)
    base = run.base
    console.print(f"base PPL {base['ppl']:.4f} (mean NLL {base['nll']:.5f}) over {run.text.get('n_scored')} scored "
                  f"tokens of {run.text.get('name')}")
    fl = d.get("noise_floor")
    if fl and fl.get("floor") is not None:
        below = d.get("below_floor")
        console.print(f"noise floor {fl['floor']:.2e} ΔPPL per {d['unit']} ({fl['floor_kind']}; float32 "
                      f"{fl['float32']:.2e}, float64 {fl['float64']:.2e}; δ=0 batch max |ΔNLL| "
                      f"{fl['zero_perturbation_max_abs_dnll']:.1e})"
                      + ("" if below is None else f"; {below:.1%} of samples below it"))
    console.print(f"samples {d['n_samples']}; skipped (non-finite) {d['n_skipped']}; redrawn (code at a grid end) "
                  f"{d['n_redrawn']}; codes pinned at an end {d['n_pinned']}")
    skipped = [f"{i}: {d['per_layer'][str(i)]['n_skipped']}/{d['per_layer'][str(i)]['n_redrawn']}" for i in layers
               if d["per_layer"][str(i)]["n_skipped"] or d["per_layer"][str(i)]["n_redrawn"]]
    if skipped:
        console.print("per layer skipped/redrawn: " + ", ".join(skipped))
    if len(order) <= 10:
        console.print(f"ranking, most to least important: {_list(order)}")
    else:
        console.print(f"most important: {_list(order[:5])}; least important: {_list(order[::-1][:5])}")
    console.print(f"{s.seconds:.1f} s of scoring, {run.seconds:.1f} s in this run")
