"""The results file of a scoring run: one JSON (plus a CSV beside it) that pruning and looping read.

Schema (`"schema": "q-psa/scores/1"`):

    {
      "schema": "q-psa/scores/1",
      "command": "baseline" | "score",
      "model": {"name", "path", "sha256", "architecture", "n_layer"},
      "text": {"name", "source", "sha256", "chars", "span", "start_token", "n_tokens", "n_scored"},
      "settings": {...},                      # every option that changes the numbers, seed included
      "versions": {"q-psa", "torch", "gguf", "numpy", "python", "threads", "cpu_kernels"},
      "base": {"ppl", "nll"},                 # the unmodified model on the same tokens
      "methods": {
        NAME: {"method", "scores": [L floats], "uncertainty": [L floats or null], "unit",
               "ranking": [layer indices, least important first], "seconds", "details": {...}}
      },
      "seconds": total wall time,
      "created": ISO time
    }

A higher score always means a more important layer. The CSV has one row per (method, layer):
method, layer, score, uncertainty, rank (0 = least important).
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.fsutil import write_atomic
from qpsa.scores.base import LayerScores

SCHEMA = "q-psa/scores/1"


def versions() -> dict:
    from importlib.metadata import version

    import gguf  # noqa: F401
    import numpy
    import torch

    import qpsa
    from qpsa.model.kernel import engine

    return {"q-psa": qpsa.__version__, "torch": torch.__version__, "gguf": version("gguf"),
            "numpy": numpy.__version__, "python": platform.python_version(), **engine()}


@dataclass
class ScoreRun:
    command: str
    model: dict
    text: dict
    settings: dict
    base: dict
    methods: dict[str, LayerScores] = field(default_factory=dict)
    seconds: float = 0.0
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "command": self.command, "model": self.model, "text": self.text,
                "settings": self.settings, "versions": self.versions, "base": self.base,
                "methods": {k: v.to_dict() for k, v in self.methods.items()},
                "seconds": self.seconds, "created": self.created}

    def to_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["method", "layer", "score", "uncertainty", "rank"])
        for name, s in self.methods.items():
            rank = {layer: r for r, layer in enumerate(s.ranking())}
            for layer, (score, unc) in enumerate(zip(s.scores, s.uncertainty)):
                w.writerow([name, layer, repr(score), "" if unc is None else repr(unc), rank[layer]])
        return out.getvalue()

    def save(self, path: str | Path) -> None:
        """Write the JSON and a CSV beside it (same name, .csv), each atomically."""
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=1))
        write_atomic(path.with_suffix(".csv"), self.to_csv())

    @classmethod
    def load(cls, path: str | Path) -> ScoreRun:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise QpsaError(f"{path}: no such results file") from None
        except (OSError, ValueError) as e:
            raise QpsaError(f"{path}: not a readable q-psa results file ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise QpsaError(f"{path}: not a q-psa results file (schema {d.get('schema') if isinstance(d, dict) else None!r})")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise QpsaError(f"{path}: results file is missing {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> ScoreRun:
        """The run `to_dict` gave (KeyError or TypeError where a field is missing)."""
        methods = {k: LayerScores.from_dict(v) for k, v in d["methods"].items()}
        return cls(d["command"], d["model"], d["text"], d["settings"], d["base"], methods, d["seconds"],
                   d["versions"], d["created"])


def rank_agreement(methods: dict[str, LayerScores]) -> list[dict]:
    """Spearman ρ and Kendall τ (with p-values) between the scores of every pair of methods, over the
    layers where both have a finite score (`n_layers` says how many)."""
    from scipy.stats import kendalltau, spearmanr

    rows = []
    for a, b in combinations(sorted(methods), 2):
        pairs = [(x, y) for x, y in zip(methods[a].scores, methods[b].scores) if _finite(x) and _finite(y)]
        if len(pairs) < 3:
            rows.append({"a": a, "b": b, "n_layers": len(pairs), "spearman": math.nan, "spearman_p": math.nan,
                         "kendall": math.nan, "kendall_p": math.nan})
            continue
        x, y = zip(*pairs)
        rho, p_rho = spearmanr(x, y)
        tau, p_tau = kendalltau(x, y)
        rows.append({"a": a, "b": b, "n_layers": len(pairs), "spearman": float(rho), "spearman_p": float(p_rho),
                     "kendall": float(tau), "kendall_p": float(p_tau)})
    return rows


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)
