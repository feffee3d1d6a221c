"""PNG plots of results (matplotlib, no display needed). Plot code computes nothing: it draws what it is given."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_scores(path: Path, methods: dict, title: str) -> None:
    """One panel per method: score per layer with ± one standard error where the method has one."""
    names = list(methods)
    cols = 2 if len(names) > 1 else 1
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = methods[name]
        layers = list(range(len(s.scores)))
        errors = [e if e is not None else 0.0 for e in s.uncertainty]
        values = [v if v is not None else float("nan") for v in s.scores]  # no score: no bar
        ax.bar(layers, values, yerr=errors if any(errors) else None, color="#4C72B0", capsize=2)
        ax.set_title(f"{name}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(_short(s.unit), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_vs_k(path: Path, edits: list, title: str, ylabel: str) -> None:
    """PPL ratio against K per method, log y axis, with ± one standard error."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(e.method for e in edits):
        rows = sorted((e for e in edits if e.method == method), key=lambda e: e.k)
        ax.errorbar([e.k for e in rows], [e.ratio for e in rows], yerr=[e.ratio_se for e in rows],
                    marker="o", capsize=3, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("K (layers)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({e.k for e in edits}))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement_heatmap(path: Path, names: list[str], matrix: list[list[float]], title: str) -> None:
    """Spearman ρ between every pair of methods."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 0.8 + 0.7 * len(names)))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="Spearman ρ")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(unit: str) -> str:
    return unit if len(unit) <= 40 else unit[:37] + "…"


def quant_sensitivity_plot(path: Path, result, title: str) -> None:
    """Mean KLD (log axis) and ΔPPL per group, ± one standard error."""
    rows = result.rows
    names = [r.group.name.replace("layer ", "").replace(".weight", "") for r in rows]
    x = list(range(len(rows)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 0.22 * len(rows) + 2), 6), sharex=True)
    top.bar(x, [max(r.stats.kld, 1e-12) for r in rows], yerr=[r.stats.kld_se for r in rows], color="#4C72B0", capsize=2)
    top.set_yscale("log")
    top.set_ylabel("mean KLD (nats/token)")
    top.grid(axis="y", alpha=0.3)
    dppl = [r.stats.dppl for r in rows]
    dppl_se = [r.stats.ppl * r.stats.dnll_se for r in rows]
    bottom.bar(x, dppl, yerr=dppl_se, color="#DD8452", capsize=2)
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_ylabel("ΔPPL")
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=90, fontsize=7)
    bottom.set_xlabel(result.granularity)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predictor_scatter(path: Path, measured: dict[str, float], predictions: dict, rhos: dict[str, tuple], title: str) -> None:
    """One panel per predictor: its value (log of the magnitude) against the measured KLD (log), one
    point per group, titled with Spearman ρ and its 95% interval."""
    names = list(predictions)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = predictions[name]
        keys = [k for k in measured if k in values and values[k] == values[k] and measured[k] > 0 and values[k] != 0]
        ax.scatter([abs(values[k]) for k in keys], [measured[k] for k in keys], s=8, alpha=0.7, color="#4C72B0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        rho, lo, hi = rhos[name]
        ax.set_title(f"{name}\nρ = {rho:.2f} [{lo:.2f}, {hi:.2f}]", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("measured KLD", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_frontier(path: Path, points: list[tuple[str, float, float, float]], frontier: list[str],
                  plan: tuple[float, float, float], budget_bpw: float, title: str) -> None:
    """Held-out KLD (log axis, ± one standard error) against bits per weight: each (label, bpw, kld, se)
    of the presets and uniform types, their Pareto frontier (labels in `frontier`, smallest first) as a
    dashed step line, the plan (bpw, kld, se) as a star, the budget as a vertical line."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    floor = 1e-7  # a KLD of 0 (a kept file) drawn at the axis floor
    same: dict[tuple[float, float], list[str]] = {}  # identical files (a preset that is a uniform type) share a label
    for label, bpw, kld, se in points:
        same.setdefault((bpw, kld), []).append(label)
    for label, bpw, kld, se in points:
        color = "#4C72B0" if label.startswith("uniform ") else "#DD8452"
        ax.errorbar(bpw, max(kld, floor), yerr=se, fmt="o", color=color, capsize=2, markersize=5)
        labels = same[(bpw, kld)]
        if labels[0] == label:
            ax.annotate(" = ".join(labels), (bpw, max(kld, floor)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    by_label = {p[0]: p for p in points}
    edge = [by_label[label] for label in frontier if label in by_label]
    if edge:
        ax.step([p[1] for p in edge], [max(p[2], floor) for p in edge], where="post", linestyle="--", color="grey",
                linewidth=1, label="presets' and uniform types' Pareto frontier")
    ax.errorbar(plan[0], max(plan[1], floor), yerr=plan[2], fmt="*", color="#C44E52", markersize=14, capsize=3,
                label="plan")
    ax.axvline(budget_bpw, color="#C44E52", linewidth=0.8, alpha=0.5, label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("held-out mean KLD (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
