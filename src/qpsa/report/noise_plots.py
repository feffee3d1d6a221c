"""PNG plot of `q-psa noise`: the hidden-state perturbation against depth. Draws what it is given."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def perturbation_by_depth(path: Path, curves: list[dict], title: str) -> None:
    """One line per σ: mean ‖h̃ − h‖/‖h‖ against depth (0 = embeddings), ± one standard error,
    log y axis; a dotted line marks σ itself. `curves`: [{"sigma", "depth", "rel", "rel_se"}]."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for c in curves:
        line = ax.errorbar(c["depth"], c["rel"], yerr=c["rel_se"], marker="o", ms=3, capsize=2,
                           label=f"σ = {c['sigma']:g}")
        ax.axhline(c["sigma"], color=line[0].get_color(), lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("depth (0 = embeddings, d = after d layers)")
    ax.set_ylabel("‖h̃ − h‖ / ‖h‖ (mean over tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
