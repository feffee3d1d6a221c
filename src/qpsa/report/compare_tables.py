"""Console rendering of `q-psa compare` (computes nothing): llama.cpp's `--kl-divergence` figures
in its order and with its labels, the per-window lines, and the generations side by side."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from qpsa.eval.compare.kld import CompareStats
from qpsa.eval.compare.run import CompareRun


def _pct(x: float, digits: int = 3) -> str:
    return f"{100 * x:.{digits}f}%"


def stats_tables(console: Console, s: CompareStats) -> None:
    """The three blocks llama.cpp prints at the end of `--kl-divergence`, same rows, same order."""
    ppl = Table(title="Perplexity statistics")
    for col, justify in (("", "left"), ("value", "right"), ("±", "right")):
        ppl.add_column(col, justify=justify)
    cor = "-" if s.cor_ln_ppl is None else f"{100 * s.cor_ln_ppl:.2f}%"
    for label, value, se in (
        ("Mean PPL(Q)", f"{s.ppl:.6f}", f"{s.ppl_se:.6f}"),
        ("Mean PPL(base)", f"{s.ppl_base:.6f}", f"{s.ppl_base_se:.6f}"),
        ("Cor(ln(PPL(Q)), ln(PPL(base)))", cor, ""),
        ("Mean ln(PPL(Q)/PPL(base))", f"{s.ln_ratio:.6f}", f"{s.ln_ratio_se:.6f}"),
        ("Mean PPL(Q)/PPL(base)", f"{s.ppl_ratio:.6f}", f"{s.ppl_ratio_se:.6f}"),
        ("Mean PPL(Q)-PPL(base)", f"{s.ppl_diff:.6f}", f"{s.ppl_diff_se:.6f}"),
    ):
        ppl.add_row(label, value, se)
    console.print(ppl)

    kld = Table(title="KL divergence statistics (nats)")
    for col, justify in (("", "left"), ("value", "right"), ("±", "right")):
        kld.add_column(col, justify=justify)
    kld.add_row("Mean KLD", f"{s.kld:.6f}", f"{s.kld_se:.6f}")
    for label, v in s.kld_quantiles.items():
        kld.add_row(f"{label} KLD", f"{v:.6f}", "")
    console.print(kld)

    tok = Table(title="Token probability statistics (Δp = p(Q) − p(base) of the correct token)")
    for col, justify in (("", "left"), ("value", "right"), ("±", "right")):
        tok.add_column(col, justify=justify)
    tok.add_row("Mean Δp", _pct(s.p_diff), _pct(s.p_diff_se))
    for label, v in s.p_diff_quantiles.items():
        tok.add_row(f"{label} Δp", _pct(v), "")
    tok.add_row("RMS Δp", _pct(s.p_diff_rms), _pct(s.p_diff_rms_se))
    tok.add_row("Same top p", _pct(s.same_top), _pct(s.same_top_se))
    console.print(tok)


def compare_report(console: Console, run: CompareRun) -> None:
    lines = Table(title="Running figures after each window (llama.cpp's per-chunk line)")
    for col in ("window", "PPL(Q)", "ln(PPL(Q)/PPL(base))", "KL divergence", "Δp RMS", "Same top p"):
        lines.add_column(col, justify="right")
    step = max(1, len(run.running) // 20)  # at most ~20 rows; the last one always
    for r in run.running:
        if r["window"] % step == 0 or r["window"] == len(run.running):
            lines.add_row(str(r["window"]), f"{r['ppl']:.4f} ± {r['ppl_se']:.4f}",
                          f"{r['ln_ratio']:.5f} ± {r['ln_ratio_se']:.5f}", f"{r['kld']:.5f} ± {r['kld_se']:.5f}",
                          f"{_pct(r['p_diff_rms'])} ± {_pct(r['p_diff_rms_se'])}",
                          f"{_pct(r['same_top'])} ± {_pct(r['same_top_se'])}")
    console.print(lines)
    stats_tables(console, run.stats)
    if run.stats.n_tokens < 100:
        console.print(f"[yellow]only {run.stats.n_tokens} scored tokens: llama.cpp prints no final statistics "
                      "under 100[/]")
    console.print(f"± is one standard error, computed as llama.cpp does; {run.n_scored:,} scored tokens in "
                  f"{run.n_windows} windows of {run.ctx}.")


def generation_report(console: Console, fmt: str, rows, base_label: str, other_label: str, max_new: int) -> None:
    table = Table(title=f"Greedy generations, up to {max_new} tokens ({fmt} prompt format); "
                        "▶ marks the first token where the two differ")
    table.add_column("prompt", overflow="fold")
    table.add_column(base_label, overflow="fold")
    table.add_column(other_label, overflow="fold")
    table.add_column("differs at token", justify="right")
    table.add_column("KL step 1", justify="right")
    for r in rows:
        table.add_row(Text(r.prompt), _marked(r.base_text, r.common_text, r.diverges_at),
                      _marked(r.other_text, r.common_text, r.diverges_at),
                      "same" if r.diverges_at is None else str(r.diverges_at), f"{r.first_step_kld:.4f}")
    console.print(table)


def _marked(text: str, common: str, at: int | None) -> Text:
    if at is None:
        return Text(text)
    if not text.startswith(common):  # a multi-byte character split where they diverge
        common = ""
    return Text.assemble(common, ("▶", "bold red"), (text[len(common):] or "(stopped)", "yellow"))
