"""Charts as inline SVG, drawn by matplotlib: no JavaScript library, no font or file fetched.

Every mark that shows a number (bar, point, heatmap cell) is drawn as its own artist with a
`gid`; matplotlib writes it as `<g id="GID">`, and `_svg` puts a `<title>` holding the number and
its ± into that group, which browsers show as a tooltip on hover (and the page's script shows at
once). Text stays text (`svg.fonttype: none`), so the page's own font renders it. Chart code
computes nothing but axis choices: it draws what it is given.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from dataclasses import dataclass
from html import escape

_ids = itertools.count()

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD"]


@dataclass
class Series:
    """One curve: points (x, y) with ± err (None for none), a tooltip per point."""

    label: str
    x: list[float]
    y: list[float]
    err: list[float | None]
    tips: list[str]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def wants_log(values) -> bool:
    """True where the positive values span two decades or more (ablation's ΔPPL does)."""
    pos = [v for v in _finite(values) if v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) >= 100


def _set_scale(ax, values, axis: str = "y") -> str:
    """log where the values span decades and are all positive, symlog where some are ≤ 0; else linear."""
    finite = _finite(values)
    if not wants_log(finite):
        return "linear"
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if min(finite) > 0:
        setter("log")
        return "log"
    pos = sorted(v for v in finite if v > 0)
    setter("symlog", linthresh=pos[len(pos) // 10])
    return "symlog"


def layer_bars(title: str, ylabel: str, values: list, errors: list, tips: list[str], width: float = 4.6,
               labels: list[str] | None = None, xlabel: str = "layer") -> str:
    """Bars per layer (index on x, or `labels`) with ± error bars; log or symlog y where the values span decades."""
    fig = _figure(width, 2.7 if labels is None else 3.4)
    ax = fig.add_subplot()
    n = len(values)
    ys = [v if v is not None and math.isfinite(v) else math.nan for v in values]
    scale = _set_scale(ax, ys)
    errs = [e if e is not None and math.isfinite(e) else 0.0 for e in errors]
    bars = ax.bar(range(n), ys, color=PALETTE[0], width=0.8)
    if any(errs):
        lo = [min(e, y - 1e-300) if scale == "log" and y > 0 else e for y, e in zip(ys, errs)]  # keep bars on log
        ax.errorbar(range(n), ys, yerr=[lo, errs], fmt="none", ecolor="#222", elinewidth=0.8, capsize=1.5)
    cid = f"c{next(_ids)}"
    found = {}
    for i, (bar, tip) in enumerate(zip(bars.patches, tips)):
        bar.set_gid(f"{cid}-{i}")
        found[f"{cid}-{i}"] = tip
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title(title + ("" if scale == "linear" else f"  ({scale} scale)"), fontsize=10)
    if labels is not None:
        step = max(1, -(-n // 40))
        ax.set_xticks(range(0, n, step), labels[::step], rotation=90, fontsize=6)
    elif n <= 40:
        ax.set_xticks(range(0, n, max(1, n // 16 + (n > 16))))
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.axhline(0, color="#666", lw=0.6)
    fig.tight_layout()
    return _svg(fig, found, title)


def curves(title: str, xlabel: str, ylabel: str, series: list[Series], log_y: bool | None = None,
           log_x: bool = False, hline: float | None = None, width: float = 6.5, height: float = 3.8,
           integer_x: bool = False) -> str:
    """Lines with ± error bars, one per series; log y where asked (or, with None, where the values span decades)."""
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cid = f"c{next(_ids)}"
    found = {}
    all_y = [y for s in series for y in s.y]
    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        errs = [e if e is not None and math.isfinite(e) else 0.0 for e in s.err]
        ax.errorbar(s.x, s.y, yerr=errs if any(errs) else None, color=color, lw=1.4, capsize=3, label=s.label)
        for i, (x, y, tip) in enumerate(zip(s.x, s.y, s.tips)):
            (point,) = ax.plot([x], [y], "o", color=color, ms=5)
            point.set_gid(f"{cid}-{k}-{i}")
            found[f"{cid}-{k}-{i}"] = tip
    if log_y or (log_y is None and wants_log(all_y) and min(_finite(all_y), default=0) > 0):
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    if integer_x:
        ax.set_xticks(sorted({x for s in series for x in s.x}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2 if len(series) > 4 else 1)
    fig.tight_layout()
    return _svg(fig, found, title)


def heatmap(title: str, rows: list[str], cols: list[str], values: list[list], tips: list[list[str]],
            cbar_label: str, vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
            log: bool = False, annotate: bool = False, row_label: str = "", col_label: str = "",
            marked: set[tuple[int, int]] = frozenset()) -> str:
    """One colored cell per (row, column), each with its tooltip; missing values are grey; `marked`
    cells get a black border (a plan's chosen types)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    flat = _finite([v for row in values for v in row])
    if log:
        pos = [v for v in flat if v > 0]
        norm = LogNorm(vmin or min(pos, default=1e-6), vmax or max(pos, default=1.0))
    else:
        norm = Normalize(vmin if vmin is not None else min(flat, default=0.0),
                         vmax if vmax is not None else max(flat, default=1.0))
    colors = colormaps[cmap]
    width = min(11.0, 2.2 + 0.55 * len(cols) + max(map(len, rows), default=0) * 0.06)
    height = min(14.0, 1.4 + 0.28 * len(rows) + max(map(len, cols), default=0) * 0.05)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cid = f"c{next(_ids)}"
    found = {}
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ok = v is not None and math.isfinite(v) and (not log or v > 0)
            face = colors(norm(v)) if ok else "#dddddd"
            mark = (i, j) in marked
            rect = Rectangle((j, i), 1, 1, facecolor=face, edgecolor="black" if mark else "white",
                             lw=1.6 if mark else 0.5, zorder=3 if mark else 1)
            rect.set_gid(f"{cid}-{i}-{j}")
            ax.add_patch(rect)
            found[f"{cid}-{i}-{j}"] = tips[i][j]
            if log and v == 0:
                ax.text(j + 0.5, i + 0.5, "0", ha="center", va="center", fontsize=7, color="#555")
            elif annotate and ok:
                r, g, b, _ = face
                ax.text(j + 0.5, i + 0.5, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.3 * r + 0.59 * g + 0.11 * b > 0.5 else "white")
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.5 for j in range(len(cols))], cols, rotation=45 if len(cols) > 3 else 0, ha="right"
                  if len(cols) > 3 else "center", rotation_mode="anchor", fontsize=7)
    step = max(1, len(rows) // 40 + (len(rows) > 40))
    ax.set_yticks([i + 0.5 for i in range(0, len(rows), step)], rows[::step], fontsize=7)
    ax.set_xlabel(col_label, fontsize=8)
    ax.set_ylabel(row_label, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(ScalarMappable(norm, colors), ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(cbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _svg(fig, found, title)


def points(title: str, xlabel: str, ylabel: str, groups: list[tuple[str, str, list[tuple]]], log_y: bool = True,
           width: float = 6.5, height: float = 4.0, line: tuple[str, list[tuple[float, float]]] | None = None) -> str:
    """Labelled points with ± y error bars: groups of (label, marker, [(x, y, yerr, tip, name), …]),
    each point named beside it (a plan against uniform types); `line` (label, [(x, y), …]) is drawn
    as a dashed step line through its points (a Pareto frontier)."""
    fig = _figure(width, height)
    ax = fig.add_subplot()
    if line and line[1]:
        xs, ys = zip(*line[1])
        ax.step(xs, ys, "--", where="post", color="#888888", lw=1, label=line[0])
    cid = f"c{next(_ids)}"
    found = {}
    for k, (label, marker, pts) in enumerate(groups):
        color = PALETTE[k % len(PALETTE)] if marker != "*" else "#C44E52"
        for i, (x, y, err, tip, name) in enumerate(pts):
            ax.errorbar([x], [y], yerr=[err] if err else None, fmt="none", ecolor=color, capsize=3)
            (p,) = ax.plot([x], [y], marker, color=color, ms=12 if marker == "*" else 7,
                           label=label if i == 0 else None)
            p.set_gid(f"{cid}-{k}-{i}")
            found[f"{cid}-{k}-{i}"] = tip
            if name:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
    if log_y and all(v > 0 for v in _finite([p[1] for _, _, pts in groups for p in pts])):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig, found, title)


_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_SIZE = re.compile(r'<svg([^>]*?) width="([\d.]+)pt" height="[^"]*"')


def _svg(fig, tips: dict[str, str], label: str) -> str:
    """The figure as an <svg> element to inline: no XML prolog, no fixed size (it scales to its box),
    a <title> in every group whose id has a tooltip."""
    from matplotlib import rc_context

    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": f"qpsa-{next(_ids)}", "font.family": "sans-serif",
                     "font.sans-serif": ["DejaVu Sans"]}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = _XML_HEAD.sub("", buf.getvalue(), count=1)
    # no fixed size: the chart fills its box, up to its natural width (1 pt = 4/3 px)
    svg = _SIZE.sub(lambda m: f'<svg{m.group(1)} class="chart" role="img" aria-label="{escape(label, quote=True)}" '
                              f'style="max-width: {float(m.group(2)) * 4 / 3:.0f}px"', svg, count=1)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)

    def titled(m: re.Match) -> str:
        tip = tips.get(m.group(1))
        return m.group(0) if tip is None else f'{m.group(0)}<title>{escape(tip)}</title>'

    return re.sub(r'<g id="([^"]+)"[^>]*>', titled, svg)
