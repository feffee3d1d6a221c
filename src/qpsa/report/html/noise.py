"""Sections for `q-psa noise`: embedding-noise curves (the perturbation through the layers, KL and
top-1 flips against σ) and the typo results with the continuations side by side."""

from __future__ import annotations

from html import escape

from qpsa.report.html import charts
from qpsa.report.html.load import Result
from qpsa.report.html.study import SE_NOTE, section
from qpsa.report.html.tables import cell, html_cell, num, pm, table, value_cell


def noise_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    d = r.data
    return [("Embedding noise", embedding_section(d["embedding"], f"{prefix}-embedding")),
            ("Typos", typo_section(d["typos"], f"{prefix}-typos"))]


def embedding_section(e: dict, sid: str) -> str:
    sigmas = e["sigmas"]
    depth = charts.curves("Relative hidden-state perturbation through the layers", "depth (0 = embeddings, d = after "
                          "d layers)", "‖h̃ − h‖ / ‖h‖ (mean over tokens)", [charts.Series(
                              f"σ = {num(s['sigma'])}", [x["depth"] for x in s["layers"]],
                              [x["rel"] for x in s["layers"]],
                              [x["rel_se"] for x in s["layers"]],
                              [f"σ = {num(s['sigma'])}, depth {x['depth']}: {pm(x['rel'], x['rel_se'])} relative "
                               f"perturbation, amplification {pm(x['amplification'], x['amplification_se'])}×"
                               for x in s["layers"]]) for s in sigmas], log_y=True,
                          integer_x=max(len(s["layers"]) for s in sigmas) <= 25)
    xs = [s["sigma"] for s in sigmas]
    kl = charts.curves("KL(clean ‖ noisy) against σ", "σ (relative to RMS of the embeddings)", "KL (nats/token)",
                       [charts.Series("KL", xs, [s["kl"]["mean"] for s in sigmas], [s["kl"]["se"] for s in sigmas],
                                      [f"σ = {num(s['sigma'])}: KL {pm(s['kl']['mean'], s['kl']['se'])} nats/token"
                                       for s in sigmas])], log_y=True, log_x=len(xs) > 1, width=5.0, height=3.4)
    flips = charts.curves("Top-1 flips against σ", "σ (relative to RMS of the embeddings)", "top-1 flips (%)",
                          [charts.Series("flips", xs, [s["flip_pct"] for s in sigmas],
                                         [s["flip_pct_se"] for s in sigmas],
                                         [f"σ = {num(s['sigma'])}: {pm(s['flip_pct'], s['flip_pct_se'])}% of positions "
                                          "change their top-1 token" for s in sigmas])], log_y=False,
                          log_x=len(xs) > 1, width=5.0, height=3.4)
    rows = [[cell(num(s["sigma"]), s["sigma"]), value_cell(s["kl"]["mean"], s["kl"]["se"]),
             value_cell(s["kl"]["median"]),
             value_cell(s["kl"]["p99"]), value_cell(s["flip_pct"], s["flip_pct_se"]),
             value_cell(s["ppl"], s["ppl_se"]), value_cell(s["ppl_ratio"], s["ppl_ratio_se"]),
             value_cell(s["layers"][-1]["amplification"], s["layers"][-1]["amplification_se"])] for s in sigmas]
    n_depth = max(len(s["layers"]) for s in sigmas)
    drows = [[cell(k, k)] + [value_cell(s["layers"][k]["rel"], s["layers"][k]["rel_se"]) if k < len(s["layers"])
                             else cell("—") for s in sigmas] for k in range(n_depth)]
    what = (f"Gaussian noise of std σ·RMS(E) added to the input embeddings E of {e.get('n_windows')} windows of "
            f"{e.get('ctx')} tokens ({num(e.get('n_scored'))} scored tokens, {e.get('samples')} draw(s) each); clean "
            f"PPL {pm(e.get('clean_ppl'), e.get('clean_ppl_se'))}. KL in nats per token; flips = % of positions whose "
            f"top-1 token changes; PPL ratio = exp(mean ΔNLL), paired; {SE_NOTE}.")
    body = (f'<div class="charts one">{depth}</div><div class="charts">{kl}{flips}</div>'
            + table(["σ", "KL mean (nats)", "KL median", "KL p99", "top-1 flips (%)", "PPL", "PPL ratio",
                     "amplification at the last layer"], rows)
            + table(["depth", *[f"σ = {num(s['sigma'])}" for s in sigmas]], drows,
                    caption="Relative perturbation ‖h̃ − h‖ / ‖h‖ at each depth (mean over tokens ± se)"))
    return section(sid, "Gaussian noise on the input embeddings", body, what)


def typo_section(t: dict, sid: str) -> str:
    rows = []
    for p in t["prompts"]:
        for draw in p["draws"]:
            rows.append([cell(p["prompt"]), cell(draw["text"]), cell(draw["n_edits"], draw["n_edits"]),
                         value_cell(draw["kl"], what="KL(clean ‖ typo) at the last prompt position, nats"),
                         cell(f"{p['top1']!r} → {draw['top1']!r}" + (" (flip)" if draw["flip"] else "")),
                         html_cell(escape(p["continuation"])),
                         html_cell(escape(draw["continuation"]) if draw["same_continuation"]
                                   else f'<mark class="diff">{escape(draw["continuation"])}</mark>')])
    kl = t["kl"]
    summary = (f"<p>KL(clean ‖ typo) at the last prompt position: mean <b>{pm(kl['mean'], kl['se'])}</b> nats "
               f"(median {num(kl['median'])}, max {num(kl['max'])}); top-1 flips "
               f"<b>{pm(t['flip_pct'], t['flip_pct_se'])}%</b>; same continuation "
               f"{pm(t['same_continuation_pct'], t['same_continuation_pct_se'])}%; {num(t['mean_edits'])} edits per "
               f"prompt on average, {t['unchanged_draws']} draw(s) without an edit.</p>")
    what = (f"Each letter of a prompt edited with probability {num(t['rate'])} ({t['samples']} draw(s) per prompt, "
            f"{'BOS first, ' if t.get('bos') else ''}plain text); greedy continuations of {t['new_tokens']} tokens "
            f"side by side, a changed one highlighted; {SE_NOTE} over prompts × draws.")
    return section(sid, "Typos in prompts", summary + table(
        ["prompt", "with typos", "edits", "KL (nats)", "top-1 clean → typo", "continuation (clean)",
         "continuation (typo)"], rows), what)
