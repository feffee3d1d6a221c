"""Validating layer rankings inside the model: remove the K least important layers, or run the K most
important ones again, and measure perplexity on held-out tokens.

Both are edits of the layer list the forward runs (`Transformer.forward(tokens, layers=...)`):

- pruning K layers: the K least important layers (by a method's ranking, ties broken by the lower
  layer index first; `--protect-first/--protect-last` layers are never candidates) are left out,
  and the residual stream passes through unchanged where they were;
- looping K layers: each of the K most important layers is run `1 + repeat` times in a row. A
  repeated pass sees the hidden states the previous pass produced, at the same positions, attends
  over the keys/values it computes from them (no cache is shared between passes), and on gemma3 a
  sliding-window layer keeps its window and rope base on every pass.

Evaluation is on held-out tokens: by default the span of the rankings' text that follows the span
the rankings were computed on (same length), or the first span of `--eval-text`. The PPL ratio is
exp(mean ΔNLL) over the same tokens, with ± from the paired per-token differences (delta method);
tokens of one window are correlated, so that ± understates the true uncertainty.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from qpsa.errors import QpsaError
from qpsa.model.load import LoadedModel
from qpsa.scores.base import EvalTokens, LayerScores, token_nll
from qpsa.stats import mean_se


def prune_candidates(scores: LayerScores, k: int, n_layer: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """The k least important layers outside the protected ones, least important first."""
    protected = set(range(protect_first)) | set(range(n_layer - protect_last, n_layer))
    order = [i for i in scores.ranking() if i not in protected]
    if k >= n_layer:
        raise QpsaError(f"--k {k}: the model has {n_layer} layers; at least one must stay")
    if k > len(order):
        raise QpsaError(f"--k {k}: only {len(order)} layers are left after protecting {protect_first} first and {protect_last} last")
    return order[:k]


def loop_candidates(scores: LayerScores, k: int, n_layer: int) -> list[int]:
    """The k most important layers, most important first."""
    if k > n_layer:
        raise QpsaError(f"--k {k}: the model has only {n_layer} layers")
    return list(reversed(scores.ranking()))[:k]


def without(n_layer: int, removed: list[int]) -> list[int]:
    return [i for i in range(n_layer) if i not in set(removed)]


def repeating(n_layer: int, repeated: list[int], repeat: int = 1) -> list[int]:
    out = []
    for i in range(n_layer):
        out += [i] * (1 + repeat if i in set(repeated) else 1)
    return out


@dataclass
class LayerEdit:
    method: str  # ranking method, or "explicit" for --layers
    k: int
    layers: list[int]  # the layers removed (prune) or repeated (loop)
    ppl: float
    ratio: float  # PPL / PPL of the unedited model on the same tokens
    ratio_se: float
    nll_delta: float
    nll_delta_se: float
    seconds: float


@dataclass
class EditReport:
    kind: str  # "prune" or "loop"
    base_ppl: float
    eval_text: dict
    edits: list[LayerEdit] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class HeldOutEvaluator:
    """Per-token NLLs of any layer list on fixed tokens, compared with the unedited model."""

    def __init__(self, loaded: LoadedModel, tokens: EvalTokens):
        self.model = loaded.model
        self.tokens = tokens
        self.base_nll = self.nll(list(range(loaded.config.n_layer)))

    def nll(self, layers: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            t = self.tokens.tokens
            h = self.model.run_layers(self.model.embed(t), layers, torch.arange(t.shape[1]))
            return token_nll(self.model, h, t)[0].double()

    @property
    def base_ppl(self) -> float:
        return math.exp(float(self.base_nll.mean()))

    def edit(self, method: str, k: int, changed: list[int], layers: list[int]) -> LayerEdit:
        start = time.perf_counter()
        nll = self.nll(layers)
        delta = nll - self.base_nll
        mean, se = mean_se(delta)
        ratio = math.exp(mean) if mean < 700 else math.inf
        return LayerEdit(method, k, changed, math.exp(float(nll.mean())) if ratio < math.inf else math.inf,
                         ratio, ratio * se, mean, se, time.perf_counter() - start)
