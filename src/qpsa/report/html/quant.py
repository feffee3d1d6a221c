"""Sections for quantization results: `q-psa sensitivity` (per layer, or a layer × tensor heatmap)
and `q-psa plan` (KLD against size beside uniform types, the recipe, its llama-quantize command)."""

from __future__ import annotations

import re
import shlex
from html import escape

from qpsa.report.html import charts
from qpsa.report.html.load import Result
from qpsa.report.html.study import SE_NOTE, section
from qpsa.report.html.tables import cell, num, pct, pct_cell, pm, size, table, value_cell

_LAYER = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")
KLD_NOTE = ("KLD = mean KL(P_base ‖ P_variant) of the next-token distributions, nats per token; ΔNLL = mean "
            "NLL_variant − NLL_base = ln(PPL_variant / PPL_base); same top = share of positions whose most likely "
            f"token is unchanged; {SE_NOTE} over tokens.")


def sensitivity_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    d = r.data
    rows = d["rows"]
    what = (f"Each {d['granularity']} alone requantized to {d['type']}, every other weight unchanged, against the "
            f"unmodified model on {num(d.get('n_tokens'))} scored tokens (base PPL {num(d.get('ppl_base'))}). "
            + KLD_NOTE + ("" if d.get("complete", True) else " <b>This run is incomplete</b> (a checkpoint)."))
    labels = [r["group"]["name"] for r in rows]
    tips = [_row_tip(r) for r in rows]
    charts_html = [charts.layer_bars(f"KLD of each {d['granularity']} alone at {d['type']}", "KLD (nats/token)",
                                     [r["kld"] for r in rows], [r["kld_se"] for r in rows], tips, width=7.5,
                                     labels=labels, xlabel=d["granularity"])]
    if d["granularity"] == "tensor":
        heat = tensor_heatmap(rows, f"KLD per layer and tensor at {d['type']}")
        if heat:
            charts_html.append(heat)
    if d["granularity"] == "expert":
        charts_html.append(expert_heatmap(rows, d["type"]))
    if d.get("expert_usage"):
        charts_html.append(usage_heatmap(d["expert_usage"]))
    trows = [[cell(r["group"]["name"], i), cell(_types(r)), cell(f"{size(r['bytes_before'])} → {size(r['bytes'])}",
                                                                 r["bytes"]),
              value_cell(r["kld"], r["kld_se"], what="mean KLD, nats per token"), value_cell(r["kld_p99"]),
              value_cell(r["kld_max"]), value_cell(r["dnll"], r["dnll_se"], what="mean ΔNLL, nats per token"),
              value_cell(r["ppl"], what=f"PPL of the variant; ΔPPL {num(r.get('dppl'))}"),
              pct_cell(r["same_top"], r["same_top_se"])] for i, r in enumerate(rows)]
    body = (f'<div class="charts one">{"".join(charts_html)}</div>'
            + table([d["granularity"], "type written", "size", "KLD (nats)", "KLD p99", "KLD max", "ΔNLL (nats)",
                     "PPL", "same top"], trows))
    return [("Sensitivity", section(f"{prefix}-sensitivity", f"Sensitivity to {d['type']}", body, what))]


def tensor_heatmap(rows: list[dict], title: str) -> str | None:
    """Layers down, tensor kinds (attn_q, ffn_down, ffn_down_exps, …) across: KLD on a log color scale.
    A MoE's expert tensors are columns of their own (all experts of a layer requantized together)."""
    cells = {}
    for r in rows:
        m = _LAYER.match(r["group"]["name"])
        if m:
            cells[(int(m.group(1)), m.group(2))] = r
    if not cells:
        return None
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: (k[0], list(cells).index(k)))))
    values = [[cells[(i, k)]["kld"] if (i, k) in cells else None for k in kinds] for i in layers]
    tips = [[_row_tip(cells[(i, k)]) if (i, k) in cells else f"layer {i}, {k}: not measured" for k in kinds]
            for i in layers]
    return charts.heatmap(title, [str(i) for i in layers], kinds, values, tips, "KLD (nats/token), log scale",
                          cmap="magma_r", log=True, row_label="layer", col_label="tensor")


def expert_heatmap(rows: list[dict], qtype: str) -> str:
    """Layers down, experts across: the KLD of each expert requantized alone."""
    cells = {(r["group"]["first_layer"], r["group"]["expert"]): r for r in rows}
    layers = sorted({k[0] for k in cells})
    experts = sorted({k[1] for k in cells})
    values = [[cells[(i, e)]["kld"] if (i, e) in cells else None for e in experts] for i in layers]
    tips = [[_row_tip(cells[(i, e)]) if (i, e) in cells else f"layer {i}, expert {e}: not measured" for e in experts]
            for i in layers]
    return charts.heatmap(f"KLD of each expert alone at {qtype}", [str(i) for i in layers], [str(e) for e in experts],
                          values, tips, "KLD (nats/token), log scale", cmap="magma_r", log=True, row_label="layer",
                          col_label="expert")


def usage_heatmap(usage: dict) -> str:
    """Layers down, experts across: the share of the measured tokens the router sent to each expert."""
    fractions = usage["fraction"]
    tips = [[f"layer {i}, expert {e}: {100 * f:.2f}% of {usage['tokens']} tokens" for e, f in enumerate(row)]
            for i, row in enumerate(fractions)]
    return charts.heatmap(f"Router usage: share of tokens routed to each expert ({usage['k']} per token)",
                          [str(i) for i in range(len(fractions))], [str(e) for e in range(len(fractions[0]))],
                          [[100 * f for f in row] for row in fractions], tips, "% of tokens", cmap="viridis",
                          log=False, row_label="layer", col_label="expert")


def plan_sections(r: Result, prefix: str) -> list[tuple[str, str]]:
    d = r.data
    plan, uniform, presets = d["plan"], d["uniform"], d.get("presets", [])
    held = (f"Checked on held-out text (the windows after the measured ones, {num(plan.get('n_tokens'))} scored "
            "tokens) against the unmodified model, beside llama-quantize's uniform types of the nearest sizes above "
            "and below" + (", and its presets (the same importance matrix)" if d.get("imatrix") else
                           ", and its presets" if presets else "") + ".")
    groups = [("plan (chosen recipe)", "*", [_point(plan, "plan")])]
    if uniform:
        groups.append(("uniform types", "o", [_point(u, u["label"].replace("uniform ", "")) for u in uniform]))
    if presets:  # llama-quantize's mixtures (Q4_K_M, …), measured as the uniform types are
        groups.append(("llama-quantize presets", "s", [_point(p, p["label"]) for p in presets]))
    frontier = [(m["bits_per_weight"], m["kld"]) for m in [*uniform, *presets] if m["label"] in d.get("frontier", [])]
    chart = charts.points(f"KLD against size: the plan at {num(d['target_bpw'])} bits/weight", "bits per weight",
                          "KLD (nats/token, held-out)", groups,
                          line=("Pareto frontier of presets and uniform types", sorted(frontier)))
    trows = [[cell(m["label"]), value_cell(m["bits_per_weight"], spec=".4f"), cell(size(m["bytes"]), m["bytes"]),
              value_cell(m["kld"], m["kld_se"], what="mean KLD on the held-out span, nats per token"),
              value_cell(m.get("predicted_kld"), m.get("predicted_kld_se"),
                         what="sum of the chosen groups' KLDs measured alone"),
              value_cell(m["dnll"], m["dnll_se"]), value_cell(m["ppl"], what=f"base PPL {num(m.get('ppl_base'))}"),
              pct_cell(m["same_top"], m["same_top_se"])] for m in [plan, *uniform, *presets]]
    target = f" (the size of {escape(d['target_preset'])})" if d.get("target_preset") else ""
    fallback = d.get("fallback")
    warn = (f"<p><b>Fallback:</b> {escape(fallback['label'])} fits the budget and measured a lower held-out KLD "
            f"({pm(fallback['kld'], fallback.get('kld_se'))}) than the plan ({num(fallback['plan_kld'])}); the recipe "
            f"is {escape(fallback['label'])}.</p>") if fallback else ""
    summary = warn + (f"<p>Target {num(d['target_bpw'])} bits per weight{target}; the plan reaches "
               f"<b>{num(plan['bits_per_weight'], '.4f')}</b> ({size(plan['bytes'])}), held-out KLD "
               f"<b>{pm(plan['kld'], plan['kld_se'])}</b> nats/token (predicted "
               f"{pm(plan.get('predicted_kld'), plan.get('predicted_kld_se'))} from the groups measured alone), "
               f"PPL {num(plan['ppl'])} against {num(plan['ppl_base'])} unmodified.</p>")
    body = (summary + f'<div class="charts one">{chart}</div>'
            + table(["model", "bits/weight", "size", "KLD (nats)", "predicted KLD", "ΔNLL (nats)", "PPL",
                     "same top"], trows))
    out = [("Plan vs presets", section(f"{prefix}-plan", "The plan against presets and uniform types", body,
                                             held + " " + KLD_NOTE))]
    out.append(("Recipe", recipe_section(d, f"{prefix}-recipe")))
    return out


def recipe_section(d: dict, sid: str) -> str:
    groups = d["groups"]
    types = list(dict.fromkeys(o["type"] for g in groups for o in g["options"]))
    values, tips, marked = [], [], set()
    for i, g in enumerate(groups):
        by_type = {o["type"]: o for o in g["options"]}
        values.append([by_type[t]["kld"] if t in by_type else None for t in types])
        tips.append([f"{g['group']} at {t}: " + (f"KLD {pm(by_type[t]['kld'], by_type[t]['kld_se'])} nats/token, "
                                                 f"{size(by_type[t]['bytes'])}" if t in by_type else "not measured")
                     + (" (chosen)" if t == g["type"] else "") for t in types])
        if g["type"] in types:
            marked.add((i, types.index(g["type"])))
    heat = charts.heatmap("KLD of each group alone at each type", [g["group"] for g in groups],
                          types, values, tips, "KLD (nats/token), log scale", cmap="magma_r", log=True,
                          marked=marked, row_label=d["granularity"], col_label="type (keep = as in the file)")
    trows = [[cell(g["group"], i), cell(g["type"]), cell(size(g["bytes"]), g["bytes"]),
              value_cell(g["predicted_kld"], g["predicted_kld_se"], what="KLD of this group alone at its type")]
             for i, g in enumerate(groups)]
    command = "llama-quantize " + " ".join(shlex.quote(a) for a in d.get("llama_quantize", []))
    body = (f'<div class="charts one">{heat}</div>'
            + table([d["granularity"], "chosen type", "size", "KLD alone (nats)"], trows)
            + '<h4>llama-quantize command</h4><p class="what">Reproduces the plan (one --tensor-type per changed '
              'tensor); replace OUT.gguf with the file to write.</p>'
            + f'<div class="command"><button type="button" class="copy" hidden>copy</button>'
              f'<pre><code>{escape(command)}</code></pre></div>')
    what = (f"A type per {d['granularity']} chosen from the candidates ({', '.join(d.get('types', []))}) to minimize "
            "the summed KLD under the size budget; in the heatmap, the chosen type of each group has a black border "
            "and keep (the file's own type) costs 0. " + SE_NOTE + ".")
    return section(sid, "Recipe", body, what)


def _point(m: dict, name: str) -> tuple:
    tip = (f"{m['label']}: {num(m['bits_per_weight'], '.4f')} bits/weight, {size(m['bytes'])}; KLD "
           f"{pm(m['kld'], m['kld_se'])} nats/token; PPL {num(m['ppl'])}; same top "
           f"{pct(m['same_top'], m['same_top_se'])}")
    return m["bits_per_weight"], m["kld"], m["kld_se"], tip, name


def _row_tip(r: dict) -> str:
    return (f"{r['group']['name']} at {_types(r)}: KLD {pm(r['kld'], r['kld_se'])} nats/token, ΔNLL "
            f"{pm(r['dnll'], r['dnll_se'])}, same top {pct(r['same_top'], r['same_top_se'])}, "
            f"{size(r['bytes_before'])} → {size(r['bytes'])}")


def _types(r: dict) -> str:
    written = sorted(set((r.get("types") or {}).values()))
    return ", ".join(written) if written and written != [r["type"]] else r["type"]
