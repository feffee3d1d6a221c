"""Perplexity with llama.cpp's protocol (tools/perplexity), so figures can be set side by side.

Protocol, for context size `ctx` (default 512):

1. Tokenize the whole text once, with BOS at its start if the vocabulary adds BOS
   (`tokenizer.ggml.add_bos_token`; Gemma does, SmolLM2 does not).
2. Cut the tokens into non-overlapping windows of `ctx`: window i is tokens [i·ctx, (i+1)·ctx).
   Only whole windows count (`n_windows = n_tokens // ctx`, at most `--chunks`); at least two
   windows' worth of tokens must exist, as in llama.cpp.
3. Where the vocabulary adds BOS, the first token of every window is replaced by BOS.
4. In each window only the second half is scored: the logits at positions ctx/2 … ctx−2 predict
   the tokens at positions ctx/2+1 … ctx−1, so ctx − 1 − ctx/2 tokens per window
   (255 for ctx 512), each seeing every earlier token of its window.
5. PPL = exp(mean NLL over all scored tokens). The ± is the standard error of the mean NLL,
   sqrt(var(NLL) / (n − 1)), carried through exp (× PPL), exactly as llama.cpp prints it. It
   treats tokens as independent, so it understates the true uncertainty somewhat.

Worked example: 2,000 tokens and ctx 512 give 3 windows (tokens 0–511, 512–1023, 1024–1535;
the last 464 are unused) and 3 × 255 = 765 scored tokens.

`max_tokens=N` reproduces the original Q-PSA study's short evaluation instead: the first N tokens
(BOS included where the vocabulary adds it) form one window of N tokens and every token after the
first is scored (N − 1 predictions).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from qpsa.errors import QpsaError
from qpsa.model.tokenizer import Tokenizer
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress
from qpsa.stats import llamacpp_mean_se

WINDOW_BATCH = 4  # windows per forward through the layers (see window_nlls)


@dataclass
class Windows:
    tokens: torch.Tensor  # (N, T) token ids, BOS already in place
    score_from: int  # first position whose logits are scored (predicting the token after it)
    description: str

    @property
    def n_scored(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1 - self.score_from)


def make_windows(
    tokenizer: Tokenizer, text: str, ctx: int = 512, chunks: int | None = None, max_tokens: int | None = None,
    context_length: int | None = None,
) -> Windows:
    """Token windows for perplexity, per the protocol in this module's docstring."""
    if max_tokens is not None:
        if max_tokens < 2:
            raise QpsaError(f"--max-tokens must be at least 2 (got {max_tokens})")
        if context_length and max_tokens > context_length:
            raise QpsaError(f"--max-tokens {max_tokens} exceeds the model's context length {context_length}")
    else:
        if ctx < 2:
            raise QpsaError(f"--ctx must be at least 2 (got {ctx})")
        if context_length and ctx > context_length:
            raise QpsaError(f"--ctx {ctx} exceeds the model's context length {context_length}")
        if chunks is not None and chunks <= 0:
            raise QpsaError(f"--chunks must be positive (got {chunks})")
    ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=tokenizer.add_eos)  # as llama.cpp adds special tokens
    if max_tokens is not None:
        if len(ids) < max_tokens:
            raise QpsaError(f"the text has {len(ids)} tokens, fewer than --max-tokens {max_tokens}")
        window = torch.tensor(ids[:max_tokens])[None]  # (1, N)
        return Windows(window, 0, f"first {max_tokens} tokens as one window, all {max_tokens - 1} predictions scored")
    n_available = len(ids) // ctx
    if len(ids) < 2 * ctx:
        raise QpsaError(f"the text has {len(ids)} tokens; --ctx {ctx} needs at least {2 * ctx}")
    n = n_available if chunks is None else chunks
    if n > n_available:
        raise QpsaError(f"the text has {len(ids)} tokens: {n_available} windows of {ctx}, fewer than --chunks {n}")
    windows = torch.tensor(ids[: n * ctx]).view(n, ctx)  # (N, T)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        windows[:, 0] = tokenizer.bos_id
    return Windows(windows, ctx // 2, f"{n} windows of {ctx} tokens, second half scored ({ctx - 1 - ctx // 2} each)")


def window_nlls(model: Transformer, windows: torch.Tensor, score_from: int) -> list[torch.Tensor]:
    """NLL (float64) of each scored token of each window (B, T): logits at score_from … T−2.

    The layers run on the B windows as one batch (the matmuls gain a few percent from the taller
    batch), and the output head on all their scored halves at once through
    `Transformer.head_nll`, which never holds more than a cache-sized slice of the logits."""
    with torch.inference_mode():
        positions = torch.arange(windows.shape[1], device=model.device)
        h = model.run_layers(model.embed(windows), range(model.config.n_layer), positions)  # (B, T, C)
        return list(model.head_nll(h[:, score_from:-1], windows[:, score_from + 1 :]).double().cpu().unbind(0))


def token_nll(model: Transformer, window: torch.Tensor, score_from: int) -> torch.Tensor:
    """NLL (float64) of each scored token of one window (T,)."""
    return window_nlls(model, window[None], score_from)[0]


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float  # standard error of PPL (llama.cpp's ±)
    nll: float  # mean NLL per scored token, nats
    nll_se: float
    n_scored: int
    n_windows: int
    ctx: int
    windows: str  # how the text was windowed
    running: list[dict] = field(default_factory=list)  # per window: cumulative ppl and se so far
    seconds: float = 0.0
    seconds_per_window: float = 0.0
    tokens_per_second: float = 0.0  # tokens passed through the model per second

    def to_dict(self) -> dict:
        return asdict(self)


def ppl_from_nll(nll: torch.Tensor) -> tuple[float, float, float, float]:
    """(ppl, ppl_se, mean_nll, nll_se) from token NLLs, as llama.cpp computes them."""
    mean, se = llamacpp_mean_se(nll)
    ppl = math.exp(mean)
    return ppl, se * ppl, mean, se


def perplexity(
    model: Transformer, windows: Windows, advance: Advance = no_progress,
    batch_size: int = WINDOW_BATCH,
) -> PerplexityResult:
    """Run every window, `batch_size` windows per forward; `advance("PPL …")` is called after each
    window with the running perplexity. The figures do not depend on the batch size beyond float32 rounding."""
    start = time.perf_counter()
    nlls, running = [], []
    n, T = windows.tokens.shape
    for first in range(0, n, batch_size):
        for nll in window_nlls(model, windows.tokens[first : first + batch_size], windows.score_from):
            nlls.append(nll)
            ppl, se, _, _ = ppl_from_nll(torch.cat(nlls))
            running.append({"window": len(nlls), "ppl": ppl, "ppl_se": se})
            advance(f"PPL {ppl:.4f}")
    seconds = time.perf_counter() - start
    ppl, ppl_se, nll, nll_se = ppl_from_nll(torch.cat(nlls))
    return PerplexityResult(
        ppl=ppl, ppl_se=ppl_se, nll=nll, nll_se=nll_se, n_scored=windows.n_scored, n_windows=n, ctx=T,
        windows=windows.description, running=running, seconds=seconds, seconds_per_window=seconds / n,
        tokens_per_second=n * T / seconds,
    )
