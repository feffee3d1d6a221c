"""Console rendering of `q-psa noise` (qpsa.eval.noise.NoiseReport). Computes nothing but formats:
each column gets one number format, and "value ± se" cells are padded so that the values and the
"±" signs line up down the column."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qpsa.eval.noise.run import NoiseReport


def _spec(values, digits: int = 3) -> str:
    """Fixed point with `digits` significant digits at the column's median magnitude (larger values
    get more integer digits), scientific where fixed point would be unreadable."""
    finite = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
    if not finite:
        return ".4f"
    if finite[-1] >= 1e7 or finite[-1] < 1e-4:
        return ".2e"
    typical = finite[len(finite) // 2]
    return f".{min(6, max(0, digits - 1 - math.floor(math.log10(typical))))}f"


def _column(values, spec: str | None = None) -> list[str]:
    spec = spec or _spec(values)
    cells = [format(v, spec) for v in values]
    width = max(map(len, cells), default=0)
    return [c.rjust(width) for c in cells]


def _pm(values, ses, spec: str | None = None) -> list[str]:
    """'value ± se' cells for one column, both parts aligned, in the values' format."""
    spec = spec or _spec(values)
    return [f"{a} ± {b}" for a, b in zip(_column(values, spec), _column(ses, spec))]


def _plain(s: str) -> Text:
    """User or model text, shown literally (no markup), newlines visible."""
    return Text(s.replace("\n", "⏎"))


def _table(title: str, columns: dict[str, list[str]], first: str = "σ") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for name in columns:
        table.add_column(name, justify="right", overflow="fold")
    for i in range(len(next(iter(columns.values())))):
        table.add_row(*(col[i] for col in columns.values()))
    return table


def sigma_tables(console: Console, r: NoiseReport) -> None:
    """Per σ: the next-token outputs, then perplexity and the amplification at the last layer."""
    e, rows = r.embedding, r.embedding.sigmas
    sigmas = _column([s.sigma for s in rows], "g")
    console.print(_table(
        f"Embedding noise, std σ·RMS(embeddings): next-token KL(clean ‖ noisy) and top-1 flips "
        f"on {e.n_scored:,} scored tokens × {e.samples} draw(s)", {
            "σ": sigmas,
            "KL nats mean ± se": _pm([s.kl.mean for s in rows], [s.kl.se for s in rows], ".2e"),
            "median": _column([s.kl.median for s in rows], ".2e"),
            "p99": _column([s.kl.p99 for s in rows], ".2e"),
            "max": _column([s.kl.max for s in rows], ".2e"),
            "top-1 flip %": _pm([s.flip_pct for s in rows], [s.flip_pct_se for s in rows], ".2f"),
        }))
    console.print(_table(
        f"Embedding noise: perplexity (clean {e.clean_ppl:.4f} ± {e.clean_ppl_se:.4f}) and the hidden-state "
        f"perturbation δh = ‖h̃ − h‖/‖h‖ at the input and after the last layer (× = out / in)", {
            "σ": sigmas,
            "PPL ± se": _pm([s.ppl for s in rows], [s.ppl_se for s in rows], _spec([e.clean_ppl], 6)),
            "ratio ± se": _pm([s.ppl_ratio for s in rows], [s.ppl_ratio_se for s in rows], ".4f"),
            "ΔPPL": _column([s.delta_ppl for s in rows], "+" + _spec([e.clean_ppl], 5)),
            "δh in": _column([s.input_rel for s in rows]),
            "δh out": _column([s.output_rel for s in rows]),
            "× out": _pm([s.layers[-1].amplification for s in rows],
                                 [s.layers[-1].amplification_se for s in rows], ".2f"),
        }))


def layer_table(console: Console, r: NoiseReport) -> None:
    """Per depth and σ: relative hidden-state perturbation ± se and its amplification."""
    rows = r.embedding.sigmas
    columns = {"depth": ["0 (emb)"] + [str(d) for d in range(1, len(rows[0].layers))]}
    for s in rows:
        rel = _pm([x.rel for x in s.layers], [x.rel_se for x in s.layers])
        amp = _column([x.amplification for x in s.layers], ".2f")
        columns[f"σ={s.sigma:g}"] = [f"{a} ×{b}" for a, b in zip(rel, amp)]
    console.print(_table("Hidden-state perturbation ‖h̃ − h‖/‖h‖ after d layers: mean over tokens ± se, "
                         "×amplification relative to depth 0", columns))


def typo_table(console: Console, r: NoiseReport) -> None:
    t = r.typos
    table = Table(title=f"Typos at rate {t.rate:g} per letter, {t.samples} draw(s) per prompt: next-token KL and "
                        f"top-1 at the last prompt position, greedy continuation ({t.new_tokens} tokens"
                        f"{', BOS first' if t.bos else ''})", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("prompt (clean, then with typos)", overflow="fold", ratio=3)
    table.add_column("edits", justify="right")
    table.add_column("KL nats", justify="right", no_wrap=True)
    table.add_column("top-1", overflow="fold", ratio=1)
    table.add_column("greedy continuation", overflow="fold", ratio=3)
    kls = _column([d.kl for p in t.prompts for d in p.draws])
    k = 0
    for i, p in enumerate(t.prompts):
        table.add_row(str(i + 1), _plain(p.prompt), "", "", _plain(repr(p.top1)), _plain(p.continuation))
        for d in p.draws:
            top = "same" if not d.flip else f"{d.top1!r}"
            cont = "(same)" if d.same_continuation else d.continuation
            table.add_row("", _plain(d.text), str(d.n_edits), kls[k], _plain(top), _plain(cont))
            k += 1
        if i < len(t.prompts) - 1:
            table.add_section()
    console.print(table)


def noise_report(console: Console, r: NoiseReport) -> None:
    sigma_tables(console, r)
    layer_table(console, r)
    typo_table(console, r)
    t = r.typos
    n = t.kl.n
    console.print(f"Typos: KL {t.kl.mean:.4g} ± {t.kl.se:.2g} nats (median {t.kl.median:.3g}, p99 {t.kl.p99:.3g}, "
                  f"max {t.kl.max:.3g}); top-1 flips {t.flip_pct:.1f} ± {t.flip_pct_se:.1f} %; same continuation "
                  f"{t.same_continuation_pct:.1f} ± {t.same_continuation_pct_se:.1f} % over {n} draws "
                  f"({t.mean_edits:.2f} edits per draw, {t.unchanged_draws} unchanged).")
    console.print(f"± is one standard error (tokens, or prompt draws, taken as independent). "
                  f"{r.embedding.seconds:.1f} s noise + {t.seconds:.1f} s typos = {r.seconds:.1f} s; seed "
                  f"{r.settings['seed']}.")
