"""What every layer-importance method shares: the evaluation tokens, cached hidden states, results.

Every method has one signature, `method(loaded, tokens, settings) -> LayerScores`, and is
registered by name in `METHODS` (see `qpsa.scores.__init__`). Higher score = more important layer.

Evaluation tokens follow the original Q-PSA study: a span of `max_tokens` tokens of the text (500
by default), BOS first where the vocabulary adds it, evaluated as one window in which every token
after the first is scored. The *score span* is the text's first `max_tokens` tokens; the
*held-out span* (used to validate rankings by pruning) is the next `max_tokens` tokens after it, so
the two never overlap.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from qpsa.errors import QpsaError
from qpsa.model.load import LoadedModel
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress
from qpsa.sources.texts import EvalText


@dataclass(frozen=True)
class ScoreSettings:
    """Settings shared by the baseline methods (Q-PSA has its own, in qpsa.scores.qpsa)."""

    seed: int = 42
    max_tokens: int = 500
    angular_n: int = 1  # angular distance compares states n layers apart


@dataclass
class EvalTokens:
    tokens: torch.Tensor  # (1, T) token ids, BOS in place where the vocabulary adds it
    text: EvalText
    span: str  # "score" or "held-out"
    start: int  # index of the span's first token in the text's token stream (BOS excluded)

    @property
    def n_scored(self) -> int:
        return self.tokens.shape[1] - 1

    def describe(self) -> dict:
        return {**self.text.describe(), "span": self.span, "start_token": self.start,
                "n_tokens": self.tokens.shape[1], "n_scored": self.n_scored}


def eval_tokens(
    loaded: LoadedModel, text: EvalText, max_tokens: int = 500, span: str = "score", start: int | None = None
) -> EvalTokens:
    """The score span (the text's first max_tokens tokens) or the held-out span (the max_tokens
    tokens that start where the score span ended, or at token `start` of the text)."""
    if max_tokens < 2:
        raise QpsaError(f"--max-tokens must be at least 2 (got {max_tokens})")
    if max_tokens > loaded.config.context_length:
        raise QpsaError(f"--max-tokens {max_tokens} exceeds the model's context length {loaded.config.context_length}")
    tok = loaded.tokenizer
    ids = tok.encode(text.text)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    body = max_tokens - len(bos)
    if span not in ("score", "held-out"):
        raise QpsaError(f"unknown span {span!r}")
    if start is None:
        start = 0 if span == "score" else body
    if len(ids) < start + body:
        raise QpsaError(f"the text has {len(ids)} tokens; the {span} span needs {start + body}")
    return EvalTokens(torch.tensor([bos + ids[start : start + body]]), text, span, start)


def token_nll(model: Transformer, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """NLL of every scored token (B, T−1), from the final hidden state h (B, T, C): logsumexp −
    target logit through `Transformer.head_nll` (a vocabulary chunk at a time; under autograd,
    over the full logits)."""
    return model.head_nll(h[:, :-1], tokens[:, 1:].expand(h.shape[0], -1))


class LayerStates:
    """Hidden states entering each layer on the evaluation tokens, computed once.

    `states[i]` is the residual stream entering layer i (i = 0 … L), `states[L]` the final one,
    so any method that changes only layer i re-runs layers i … L−1 from `states[i]`.
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, advance: Advance = no_progress):
        """`advance()` is called after each layer."""
        self.model = model
        self.tokens = tokens
        self.positions = torch.arange(tokens.shape[1])
        with torch.inference_mode():
            h = model.embed(tokens)
            self.states = [h]
            for i in range(model.config.n_layer):
                h = model.block(i, h, self.positions)
                self.states.append(h)
                advance()
            self.base_nll = token_nll(model, h, tokens)[0]  # (T−1,)

    def nll_from(self, i: int, h: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
        """Token NLLs (B, T−1) when hidden state h (B, T, C) enters layer i and `layers` follow
        (default: i … L−1)."""
        if layers is None:
            layers = list(range(i, self.model.config.n_layer))
        with torch.inference_mode():
            return token_nll(self.model, self.model.run_layers(h, layers, self.positions), self.tokens)


@dataclass
class LayerScores:
    method: str
    scores: list[float]  # one per layer; higher = more important
    uncertainty: list[float | None]  # one standard error per layer (None where the method has none)
    unit: str  # what a score means, e.g. "ΔPPL when the layer is skipped"
    seconds: float
    details: dict = field(default_factory=dict)  # method-specific: per-matrix breakdown, n_skipped, …

    def ranking(self) -> list[int]:
        """Layers from least to most important; ties broken by the lower layer index first.

        A layer whose score is unknown (None/NaN) ranks as most important, so pruning never
        removes it on the strength of a missing number."""
        return sorted(range(len(self.scores)), key=lambda i: (_sort_key(self.scores[i]), i))

    def to_dict(self) -> dict:
        return {**asdict(self), "ranking": self.ranking()}

    @classmethod
    def from_dict(cls, d: dict) -> LayerScores:
        return cls(d["method"], d["scores"], d["uncertainty"], d["unit"], d["seconds"], d.get("details", {}))


def _sort_key(score: float) -> float:
    return math.inf if score is None or math.isnan(score) else score


def ppl_of(nll: torch.Tensor) -> float:
    return math.exp(float(nll.double().mean()))
