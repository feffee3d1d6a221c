"""Helpers shared by the report tests."""

from __future__ import annotations

import json
from pathlib import Path


def data_of(path: Path) -> dict:
    """The JSON a result path stands for (a folder's study.json, plan.json or noise.json)."""
    if path.is_dir():
        path = next(path / n for n in ("study.json", "plan.json", "noise.json") if (path / n).exists())
    return json.loads(path.read_text(encoding="utf-8"))


def pm(x, se, spec=".4g", se_spec=".2g") -> str:
    """"value ± se" as the report writes it: results.md's formats, a standard error from 100 to 10⁶
    in full (820, not 8.2e+02)."""
    se_text = format(se, se_spec)
    if se_spec == ".2g" and 100 <= abs(se) < 1e6:
        se_text = f"{float(se_text):.0f}"
    return f"{format(x, spec)} ± {se_text}"


def key_numbers(kind: str, d: dict) -> list[str]:
    """A few numbers of a result, formatted as the page must show them."""
    if kind == "study":
        m = d["scores"]["methods"]["layer_ablation"]
        e = d["prune"]["edits"][0]
        return [d["model"]["sha256"], pm(m["scores"][0], m["uncertainty"][0]), pm(e["ratio"], e["ratio_se"]),
                format(d["agreement"][0]["spearman"], ".3f")]
    if kind == "scores":
        m = next(iter(d["methods"].values()))
        return [d["model"]["sha256"], format(m["scores"][-1], ".4g")]
    if kind == "edits":
        return [pm(e["ratio"], e["ratio_se"]) for e in d["edits"]]
    if kind == "sensitivity":
        return [pm(r["kld"], r["kld_se"]) for r in d["rows"][:3]]
    if kind == "plan":
        return [pm(d["plan"]["kld"], d["plan"]["kld_se"]), "llama-quantize --allow-requantize"]
    if kind == "compare":
        s = d["statistics"]
        return [f"{s['kld']:.6f} ± {s['kld_se']:.6f}", f"{100 * s['same_top']:.3f}%"]
    if kind == "noise":
        s = d["embedding"]["sigmas"][-1]
        return [pm(s["kl"]["mean"], s["kl"]["se"]), pm(s["layers"][-1]["rel"], s["layers"][-1]["rel_se"])]
    raise ValueError(kind)
