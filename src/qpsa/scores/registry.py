"""Every layer-scoring method by name: the one list that `q-psa baseline`, `q-psa score` and the
study look methods up in.

An entry names the function that computes it, `compute(loaded, tokens, settings, advance) ->
LayerScores` (docs/scores.md), by import path, so that reading the list (for `--help`, or to check
a name) imports no torch. `settings` is a `ScoreSettings` for the baselines and a `QpsaSettings`
for Q-PSA. A new method: write its function, add one line here, and say what it measures in
docs/scores.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from qpsa.errors import QpsaError


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    function: str  # "module:function" of compute(loaded, tokens, settings, advance) -> LayerScores
    command: str  # the command that runs it on its own: "baseline" or "score"
    summary: str

    def compute(self) -> Callable:
        module, function = self.function.split(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, ScoreMethod] = {m.name: m for m in (
    ScoreMethod("layer_ablation", "qpsa.scores.baselines:layer_ablation", "baseline",
                "ΔPPL when the layer is skipped"),
    ScoreMethod("weight_norm", "qpsa.scores.baselines:weight_norm", "baseline",
                "Frobenius norm of the layer's weight matrices (seven; an MoE layer's router and experts)"),
    ScoreMethod("random", "qpsa.scores.baselines:random_scores", "baseline",
                "a seeded random permutation (the floor every method must beat)"),
    ScoreMethod("block_influence", "qpsa.scores.baselines:block_influence", "baseline",
                "ShortGPT's 1 − mean cos(h_in, h_out)"),
    ScoreMethod("angular_distance", "qpsa.scores.baselines:angular_distance", "baseline",
                "mean arccos(cos(h_i, h_{i+n}))/π"),
    ScoreMethod("fisher", "qpsa.scores.baselines:fisher", "baseline",
                "Σ (∂NLL/∂w · grid step)² over the layer's weights"),
    ScoreMethod("qpsa", "qpsa.scores.qpsa.run:qpsa_layer_scores", "score",
                "mean ΔPPL of ±1 grid moves of the layer's quantized weights"),
)}


def method_names(command: str | None = None) -> list[str]:
    """The registered names, in registration order; only those `command` runs, if given."""
    return [m.name for m in METHODS.values() if command is None or m.command == command]


def find_method(name: str, command: str | None = None) -> ScoreMethod:
    """The method called `name`; QpsaError naming the available ones otherwise."""
    known = method_names(command)
    if name not in known:
        raise QpsaError(f"unknown method {name!r}; known: {', '.join(known)}")
    return METHODS[name]
