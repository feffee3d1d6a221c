"""Sections for `q-psa compare`: llama.cpp's `--kl-divergence` statistics in its order and with its
labels, the running per-window figures, and the greedy answers side by side with the first token
where they differ marked."""

from __future__ import annotations

from html import escape

from qpsa.report.html import charts
from qpsa.report.html.load import Result
from qpsa.report.html.study import SE_NOTE, section
from qpsa.report.html.tables import cell, html_cell, num, pct, pct_cell, table, value_cell


def compare_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    d = r.data
    out = [("KLD statistics", statistics_section(d, f"{prefix}-stats"))]
    if d.get("running"):
        out.append(("Per window", running_section(d["running"], f"{prefix}-running")))
    gen = d.get("generations") or {}
    if gen.get("prompts"):
        out.append(("Answers", answers_section(gen, f"{prefix}-answers")))
    return out


def statistics_section(d: dict, sid: str) -> str:
    s = d["statistics"]
    cor = "—" if s.get("cor_ln_ppl") is None else f"{100 * s['cor_ln_ppl']:.2f}%"
    f6 = ".6f"
    ppl_rows = [
        ["Mean PPL(Q)", value_cell(s["ppl"], s["ppl_se"], f6, se_spec=f6)],
        ["Mean PPL(base)", value_cell(s["ppl_base"], s["ppl_base_se"], f6, se_spec=f6)],
        ["Cor(ln(PPL(Q)), ln(PPL(base)))", cell(cor)],
        ["Mean ln(PPL(Q)/PPL(base))", value_cell(s["ln_ratio"], s["ln_ratio_se"], f6, se_spec=f6)],
        ["Mean PPL(Q)/PPL(base)", value_cell(s["ppl_ratio"], s["ppl_ratio_se"], f6, se_spec=f6)],
        ["Mean PPL(Q)-PPL(base)", value_cell(s["ppl_diff"], s["ppl_diff_se"], f6, se_spec=f6)],
    ]
    kld_rows = [["Mean KLD", value_cell(s["kld"], s["kld_se"], f6, se_spec=f6)]]
    kld_rows += [[f"{label} KLD", value_cell(v, spec=f6)] for label, v in s.get("kld_quantiles", {}).items()]
    tok_rows = [["Mean Δp", pct_cell(s["p_diff"], s["p_diff_se"])]]
    tok_rows += [[f"{label} Δp", pct_cell(v)] for label, v in s.get("p_diff_quantiles", {}).items()]
    tok_rows += [["RMS Δp", pct_cell(s["p_diff_rms"], s["p_diff_rms_se"])],
                 ["Same top p", pct_cell(s["same_top"], s["same_top_se"])]]
    body = (f'<p>Same top token at <b>{pct(s["same_top"], s["same_top_se"])}</b> of {num(s["n_tokens"])} scored '
            f'positions; mean KLD <b>{num(s["kld"], f6)} ± {num(s["kld_se"], f6)}</b> nats.</p>'
            '<div class="side">'
            + table(["Perplexity statistics", "value ± se"], ppl_rows, sortable=False)
            + table(["KL divergence statistics (nats)", "value ± se"], kld_rows, sortable=False)
            + table(["Token probability (Δp = p(Q) − p(base) of the correct token)", "value ± se"], tok_rows,
                    sortable=False)
            + "</div>")
    what = (f"Q = the other model, base = the reference, over {num(d.get('n_scored'))} scored tokens in "
            f"{d.get('chunks')} windows of {d.get('ctx')} (second half scored), as llama.cpp's --kl-divergence "
            f"prints them; {SE_NOTE}, computed as llama.cpp does.")
    return section(sid, "KL divergence and top-token agreement", body, what)


def running_section(running: list[dict], sid: str) -> str:
    xs = [w["window"] for w in running]
    kld = charts.curves("Running mean KLD after each window", "window", "KLD (nats/token)", [charts.Series(
        "KLD", xs, [w["kld"] for w in running], [w["kld_se"] for w in running],
        [f"after window {w['window']}: KLD {num(w['kld'], '.5f')} ± {num(w['kld_se'], '.5f')} nats, same top "
         f"{pct(w['same_top'], w['same_top_se'])}" for w in running])], log_y=False, width=6.0, height=3.0,
        integer_x=len(xs) <= 20)
    same = charts.curves("Running share of positions with the same top token", "window", "same top p (%)", [
        charts.Series("same top", xs, [100 * w["same_top"] for w in running], [100 * w["same_top_se"] for w in running],
                      [f"after window {w['window']}: same top {pct(w['same_top'], w['same_top_se'])}"
                       for w in running])], log_y=False, width=6.0, height=3.0, integer_x=len(xs) <= 20)
    rows = [[cell(w["window"], w["window"]), value_cell(w["ppl"], w["ppl_se"], ".4f", se_spec=".4f"),
             value_cell(w["ln_ratio"], w["ln_ratio_se"], ".5f", se_spec=".5f"),
             value_cell(w["kld"], w["kld_se"], ".5f", se_spec=".5f"),
             pct_cell(w["p_diff_rms"], w["p_diff_rms_se"]),
             pct_cell(w["same_top"], w["same_top_se"])] for w in running]
    body = (f'<div class="charts">{kld}{same}</div>'
            + table(["window", "PPL(Q)", "ln(PPL(Q)/PPL(base))", "KL divergence", "Δp RMS", "Same top p"], rows))
    return section(sid, "Running figures after each window", body,
                   f"llama.cpp's per-chunk line: each figure over all windows so far; {SE_NOTE}.")


def answers_section(gen: dict, sid: str) -> str:
    rows = []
    for a in gen["prompts"]:
        at = a.get("diverges_at")
        rows.append([cell(a["prompt"]), html_cell(marked(a["base_text"], a.get("common_text", ""), at)),
                     html_cell(marked(a["other_text"], a.get("common_text", ""), at)),
                     cell("same" if at is None else at, -1 if at is None else at),
                     value_cell(a["first_step_kld"], spec=".4f", what="KL(base ‖ other) at the first step, nats")])
    what = (f"Greedy continuations of up to {gen.get('max_new_tokens')} tokens ({gen.get('format')} prompt format). "
            '<mark class="diff">▶</mark> marks the first generated token where the two answers differ; '
            "KL step 1 is KL(base ‖ other) of the first next-token distributions, in nats.")
    return section(sid, "Answers side by side", table(["prompt", "base", "other", "differs at token", "KL step 1"],
                                                       rows), what)


def marked(text: str, common: str, at: int | None) -> str:
    """The answer with the part from its first differing token on highlighted (the whole answer
    plain where both models gave the same)."""
    if at is None:
        return escape(text)
    if not text.startswith(common):  # a multi-byte character split where they diverge
        common = ""
    rest = text[len(common):]
    return f'{escape(common)}<mark class="diff">▶{escape(rest) if rest else "(stopped)"}</mark>'
