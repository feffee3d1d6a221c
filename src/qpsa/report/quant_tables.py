"""Console rendering of requantization, quantization sensitivity and mixed-precision plans (computes nothing)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from qpsa.report.tables import _bytes


def requantize_report(console: Console, r: dict) -> None:
    """Tensors grouped by (source type -> target type, reason), then sizes before and after."""
    groups: dict[tuple, list] = defaultdict(list)
    for t in r["tensors"]:
        groups[(t["source"], t["target"], t["why"])].append(t)
    table = Table(title=f"{r['model']['path']} -> {r['output'] or '(dry run)'}")
    for col, justify in (("from", "left"), ("to", "left"), ("why", "left"), ("tensors", "right"), ("bytes", "right"),
                         ("example", "left")):
        table.add_column(col, justify=justify)
    for (source, target, why), tensors in sorted(groups.items(), key=lambda kv: -sum(t["bytes"] for t in kv[1])):
        table.add_row(source, target, why, str(len(tensors)), _bytes(sum(t["bytes"] for t in tensors)), tensors[0]["name"])
    console.print(table)
    if r.get("imatrix"):
        im = r["imatrix"]
        without = f"; without (no entry): {', '.join(im['unweighted'])}" if im["unweighted"] else ""
        console.print(f"importance matrix {im['path']} ({im['entries']} entries): {im['weighted']} tensors weighted{without}")
    b, a = r["before"], r["after"]
    console.print(f"tensor data {_bytes(b['tensor_bytes'])} at {b['bits_per_weight']:.3f} bits/weight -> "
                  f"{_bytes(a['tensor_bytes'])} at {a['bits_per_weight']:.3f} bits/weight; "
                  f"{a['changed']} of {a['tensors']} tensors re-encoded in {r['seconds']:.1f} s")


def sensitivity_report(console: Console, result, header: dict) -> None:
    """One row per group in model order; rank 1 is the most sensitive (largest mean KLD)."""
    order = sorted(range(len(result.rows)), key=lambda k: -result.rows[k].stats.kld)
    rank = {k: n + 1 for n, k in enumerate(order)}
    table = Table(title=f"Each {result.granularity} alone requantized to {result.qtype}, against the unmodified model "
                        f"(PPL {result.ppl_base:.4f}, {result.n_tokens} tokens)")
    usage = result.expert_usage
    per_expert = usage is not None and any(r.group.expert is not None for r in result.rows)
    cols = ("rank", "group", "MiB", "KLD ± se", "p99", "ΔPPL ± se", "same top") + (("routed",) if per_expert else ())
    for col in cols:
        table.add_column(col, justify="left" if col == "group" else "right", no_wrap=True)
    for k, r in enumerate(result.rows):
        s = r.stats
        fallback = sorted({t for t in r.types.values() if t != result.qtype})
        name = r.group.name + (f" ({', '.join(fallback)})" if fallback else "")
        routed = ()
        if per_expert:
            routed = (f"{100 * usage['fraction'][r.group.first_layer][r.group.expert]:.1f}%",)
        table.add_row(str(rank[k]), name, f"{r.bytes_before / 2**20:.2f}→{r.bytes / 2**20:.2f}",
                      f"{s.kld:.2e} ± {s.kld_se:.0e}", f"{s.kld_p99:.1e}", f"{s.dppl:+.3f} ± {s.ppl * s.dnll_se:.3f}",
                      f"{100 * s.same_top:.1f}%", *routed)
    console.print(table)
    if usage is not None:
        expert_usage_report(console, usage)
    console.print(f"types in brackets: fallbacks where {result.qtype} cannot encode a tensor's rows. "
                  f"Text {header['text']['name']} (sha256 {header['text']['sha256'][:12]}…), {header['windows']}; "
                  f"{result.seconds:.0f} s")


def expert_usage_report(console: Console, usage: dict) -> None:
    """Per MoE layer: how the router spread the measured tokens over the experts."""
    table = Table(title=f"Router usage on the measured text ({usage['tokens']} tokens per layer, "
                        f"{usage['k']} experts per token; % of tokens routed to an expert)")
    for col in ("layer", "busiest", "least used", "unused experts", "busiest's share"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, fractions in enumerate(usage["fraction"]):
        hi = max(range(len(fractions)), key=fractions.__getitem__)
        lo = min(range(len(fractions)), key=fractions.__getitem__)
        table.add_row(str(i), f"{hi}: {100 * fractions[hi]:.1f}%", f"{lo}: {100 * fractions[lo]:.1f}%",
                      str(sum(f == 0 for f in fractions)), f"{100 * usage['top_share'][i]:.1f}%")
    console.print(table)


def plan_report(console: Console, r) -> None:
    """The chosen type per group, then the plan checked against uniform types on held-out text."""
    size = f"{r.target_bpw:.4f} bits/weight" + (f", the size of {r.target_preset}" if r.target_preset else "")
    weighted = f"; imatrix sha256 {r.imatrix['sha256'][:12]}…" if r.imatrix else ""
    table = Table(title=f"Plan at {size} ({r.granularity} granularity, types {' '.join(r.types)}{weighted})")
    for col in ("group", "type", "MiB", "predicted KLD ± se"):
        table.add_column(col, justify="left" if col in ("group", "type") else "right", no_wrap=True)
    for g in r.groups:
        table.add_row(g["group"], g["type"], f"{g['bytes'] / 2**20:.2f}", f"{g['predicted_kld']:.2e} ± {g['predicted_kld_se']:.1e}")
    console.print(table)
    check = Table(title="Checked on the held-out span, against the unmodified model; beside llama-quantize's presets "
                        "and uniform types")
    for col in ("model", "bpw", "MiB", "predicted KLD", "KLD ± se", "p99", "PPL", "ΔPPL ± se", "same top"):
        check.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for m in sorted([r.plan, *r.uniform, *r.presets], key=lambda m: -m.n_bytes):
        s = m.stats
        predicted = f"{m.predicted_kld:.2e} ± {m.predicted_kld_se:.0e}" if m.predicted_kld is not None else "-"
        check.add_row(m.label, f"{m.bits_per_weight:.3f}", f"{m.n_bytes / 2**20:.2f}", predicted,
                      f"{s.kld:.2e} ± {s.kld_se:.0e}", f"{s.kld_p99:.1e}", f"{s.ppl:.3f}",
                      f"{s.dppl:+.3f} ± {s.ppl * s.dnll_se:.3f}", f"{100 * s.same_top:.1f}%")
    console.print(check)
    console.print(f"unmodified PPL {r.plan.stats.ppl_base:.4f} on the held-out span; plan made in {r.seconds:.0f} s")
    if r.fallback:
        f = r.fallback
        console.print(f"[bold]fallback:[/bold] {f['label']} fits the budget and measured a lower held-out KLD than the "
                      f"plan ({f['kld']:.4g} vs {f['plan_kld']:.4g}); the recipe (and --output) are {f['label']}")


def imatrix_report(console: Console, r: dict) -> None:
    """The tensors with the largest mean in_sum2/count, then what was written (or read)."""
    im = r["imatrix"]
    table = Table(title=f"Importance matrix: the {len(im['top'])} tensors with the largest mean Σx²/count "
                        f"(of {im['tensors']})")
    for col in ("rank", "tensor", "mean Σx²/count"):
        table.add_column(col, justify="left" if col == "tensor" else "right", no_wrap=True)
    for k, t in enumerate(im["top"], 1):
        table.add_row(str(k), t["tensor"], f"{t['mean_in_sum2']:.4g}")
    console.print(table)
    counts = ", ".join(f"{c:,}" for c in im["counts"])
    unit = "chunks (legacy .dat)" if im["legacy"] else "rows"
    console.print(f"{im['chunk_count']} chunks of {im['chunk_size']} tokens; counts {counts} {unit}; "
                  f"datasets {', '.join(im['datasets']) or '-'}")
    if r.get("output"):
        console.print(f"wrote {r['output']} ({r['format']}) in {r['seconds']:.1f} s")
    else:
        console.print(f"read {r['input']}: matches the model's tensor names and sizes")


def predictors_report(console: Console, r) -> None:
    """Per type: each predictor's Spearman ρ against the measured KLD and its cost beside the measurement's."""
    for qtype in r.measured:
        table = Table(title=f"Predictors of the measured KLD, each {r.granularity} alone to {qtype} "
                            f"(Spearman ρ; cost in forward passes; measurement: {r.measurement_passes:.0f} passes, "
                            f"{r.measurement_seconds[qtype]:.0f} s)")
        for col in ("predictor", "ρ", "95% CI", "n", "passes", "% of meas.", "s", "% of meas. s"):
            table.add_column(col, justify="left" if col == "predictor" else "right", no_wrap=True)
        for row in sorted((x for x in r.rows if x.qtype == qtype), key=lambda x: -(x.rho if x.rho == x.rho else -2)):
            table.add_row(row.predictor, f"{row.rho:.3f}", f"[{row.lo:.3f}, {row.hi:.3f}]", str(row.n),
                          f"{row.forward_equivalents:.1f}", f"{100 * row.cost_fraction:.1f}%", f"{row.seconds:.1f}",
                          f"{100 * row.seconds_fraction:.1f}%")
        console.print(table)
