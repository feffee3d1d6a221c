"""Comparing two models token by token, with llama.cpp's `--kl-divergence` statistics.

Both models see the same windows as perplexity (`qpsa.eval.perplexity.make_windows`: windows of
`ctx` tokens, BOS first where the vocabulary adds it, the second half scored). At every scored
position the base's full distribution is kept as llama.cpp keeps it (`--kl-divergence-base`):

* the log-softmax over the vocabulary, clipped 16 nats below the top logit, stored as one uint16
  per token of the vocabulary with a per-position float32 step and float32 floor:
  `log p_i = step · code_i + floor`, with `step = (top − clip)/65535` ≤ 16/65535 ≈ 2.44e-4 nats,
  so each stored log-probability is within 1.22e-4 nats of the exact one. Logits at or below the
  clip get code 0 (the floor, ≤ −16 nats).

and the statistics are those llama.cpp computes from it (tools/perplexity/perplexity.cpp,
`kl_divergence`), per scored token t with target y_t, base p (from the stored log-probs) and other q:

* nll_t = −log q(y_t), nll_base_t = −log p(y_t);  PPL = exp(mean nll), PPL(base) likewise;
* KLD_t = Σ_i p_i (log p_i − log q_i) over the tokens i with log p_i > −16 (the rest, under
  ~1e-7 of the probability, are left out, not renormalized);
* Δp_t = q(y_t) − p(y_t), the change of the probability of the correct token;
* same top: the argmax of q equals the argmax of the stored p (first index on ties).

Means carry llama.cpp's ± (`mean_and_uncertainty`: sqrt((mean(x²) − mean(x)²)/(n − 1)), 0 for
n ≤ 10); percentiles interpolate linearly between sorted values at fraction·(n − 1). The base is
always used in its stored form, so a comparison run live and one reusing a saved base file give
identical figures, and the figures differ from llama.cpp's only by the two engines' logits.
Shapes: S scored positions of a window, V vocabulary, N windows, T = ctx.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.eval.compare.kld import CompareStats, TokenStats, compare_stats, running_line, token_stats
from qpsa.eval.compare.logprobs import BaseLogProbsFile, BaseLogProbsWriter, encode_log_probs
from qpsa.eval.perplexity import Windows
from qpsa.model.transformer import Transformer
from qpsa.progress import SILENT, Advance, Progress, no_progress

# ---- running both models over the windows --------------------------------------------------------


def scored_logits(model: Transformer, window: torch.Tensor, score_from: int) -> torch.Tensor:
    """Logits (S, V) at positions score_from … T−2 of one window (T,), those that predict a scored token."""
    with torch.inference_mode():
        positions = torch.arange(window.shape[0])
        h = model.run_layers(model.embed(window[None]), range(model.config.n_layer), positions)  # (1, T, C)
        return model.logits(h[:, score_from:-1])[0]  # (S, V)


@dataclass
class CompareRun:
    stats: CompareStats
    running: list[dict]  # llama.cpp's per-chunk line after each window
    n_windows: int
    ctx: int
    n_scored: int
    base_seconds: float  # the base's forward passes and encoding (0 when read from a file)
    other_seconds: float  # the other's forward passes and the statistics
    tokens: TokenStats = field(repr=False)

    def to_dict(self) -> dict:
        return {"statistics": self.stats.to_dict(), "running": self.running, "n_windows": self.n_windows,
                "ctx": self.ctx, "n_scored": self.n_scored, "base_seconds": self.base_seconds,
                "other_seconds": self.other_seconds}


def compare_windows(
    other: Transformer,
    windows: Windows,
    base: Transformer | BaseLogProbsFile,
    save: BaseLogProbsWriter | None = None,
    progress: Progress = SILENT,
) -> CompareRun:
    """Run the base (or read its stored rows) and the other model window by window, interleaved,
    so memory holds one window at a time. `progress` gets a task per model run (none for a stored
    base); the other's status is llama.cpp's running per-chunk KLD and same-top share."""
    N, T = windows.tokens.shape
    with ExitStack() as tasks:
        advance_base = no_progress if isinstance(base, BaseLogProbsFile) else tasks.enter_context(progress.task("base", N))
        advance_other = tasks.enter_context(progress.task("other", N))
        return _compare_windows(other, windows, base, save, advance_base, advance_other)


def _compare_windows(other, windows, base, save, advance_base: Advance, advance_other: Advance) -> CompareRun:
    N, T = windows.tokens.shape
    sf = windows.score_from
    parts, running = [], []
    base_seconds = other_seconds = 0.0
    for i in range(N):
        window = windows.tokens[i]
        t0 = time.perf_counter()
        if isinstance(base, BaseLogProbsFile):
            rows = base.rows(i)
        else:
            rows = encode_log_probs(scored_logits(base, window, sf))  # (S, row_width)
            if save is not None:
                save.write(rows)
            base_seconds += time.perf_counter() - t0
            advance_base()
        t1 = time.perf_counter()
        parts.append(token_stats(rows, scored_logits(other, window, sf), window[sf + 1 :]))
        line = {"window": i + 1, **running_line(TokenStats.concat(parts))}
        running.append(line)
        other_seconds += time.perf_counter() - t1
        advance_other(f"KLD {line['kld']:.4f}  same top {100 * line['same_top']:.1f}%")
    tokens = TokenStats.concat(parts)
    return CompareRun(compare_stats(tokens), running, N, T, len(tokens), base_seconds, other_seconds, tokens)


# ---- what must agree between the two models, and with a base file ---------------------------------

# metadata that decides how text becomes token ids (bos/eos ids and token types may differ harmlessly)
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                  "tokenizer.ggml.scores", "tokenizer.ggml.add_bos_token")


def tokenizer_fingerprint(metadata: dict) -> str:
    """sha256 over the tokenizer metadata in TOKENIZER_KEYS (a missing key counts as null)."""
    digest = hashlib.sha256()
    for key in TOKENIZER_KEYS:
        digest.update(json.dumps([key, metadata.get(key)], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def check_same_vocabulary(base_name: str, base_md: dict, base_vocab: int,
                          other_name: str, other_md: dict, other_vocab: int) -> None:
    """Refuse, naming what differs, two models whose logits do not index the same tokens."""
    if base_vocab != other_vocab:
        raise QpsaError(f"the models have different vocabularies: {base_name} has {base_vocab:,} tokens, "
                        f"{other_name} {other_vocab:,}; compare needs the same tokens")
    a, b = base_md.get("tokenizer.ggml.tokens") or [], other_md.get("tokenizer.ggml.tokens") or []
    if a != b:
        if len(a) != len(b):
            raise QpsaError(f"the models have different token lists: {len(a):,} tokens in {base_name}, "
                            f"{len(b):,} in {other_name}")
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise QpsaError(f"the models have different token lists: token {i} is {a[i]!r} in {base_name} "
                        f"and {b[i]!r} in {other_name}")
    for key in TOKENIZER_KEYS:
        if base_md.get(key) != other_md.get(key):
            show = (lambda v: repr(v) if not isinstance(v, list) else f"{len(v):,} entries")
            raise QpsaError(f"the models have different tokenizers: {key} is {show(base_md.get(key))} in "
                            f"{base_name} and {show(other_md.get(key))} in {other_name}")


def check_base_file(bf: BaseLogProbsFile, windows: Windows, n_vocab: int, model_sha256: str,
                    text: dict, fingerprint: str, bos_id: int | None = None) -> None:
    """Refuse a base file computed on another text, ctx, chunks, model or vocabulary than this run.
    `bos_id`: the BOS that replaces each window's first token, where the vocabulary adds BOS (a file
    llama.cpp wrote keeps the text's own first tokens there)."""
    N, T = windows.tokens.shape
    m = bf.meta
    if m is not None:
        ft = m.get("text", {})
        if ft.get("sha256") != text["sha256"]:
            raise QpsaError(f"{bf.path}: computed on the text {ft.get('name')} (sha256 {str(ft.get('sha256'))[:12]}…), "
                            f"not {text['name']} (sha256 {text['sha256'][:12]}…); pass the same --text/--dataset")
    if bf.ctx != T:
        raise QpsaError(f"{bf.path}: computed with --ctx {bf.ctx}, not {T}")
    if bf.n_chunk != N:
        raise QpsaError(f"{bf.path}: holds {bf.n_chunk} windows, not --chunks {N}")
    if bf.n_vocab != n_vocab:
        raise QpsaError(f"{bf.path}: computed over a vocabulary of {bf.n_vocab:,} tokens; the models have {n_vocab:,}")
    if m is not None:
        fm = m.get("model", {})
        if fm.get("sha256") != model_sha256:
            raise QpsaError(f"{bf.path}: computed from the model {fm.get('name')} (sha256 {str(fm.get('sha256'))[:12]}…), "
                            f"not BASE (sha256 {model_sha256[:12]}…)")
        if m.get("tokenizer_sha256") != fingerprint:
            raise QpsaError(f"{bf.path}: computed with another tokenizer than BASE's")
    theirs, mine = bf.tokens.copy(), windows.tokens.numpy()
    if bos_id is not None:
        theirs[:, 0] = bos_id
    if not np.array_equal(theirs, mine):
        w, t = map(int, np.argwhere(theirs != mine)[0])
        raise QpsaError(f"{bf.path}: its tokens differ from this text's at window {w + 1}, position {t} "
                        f"({int(theirs[w, t])} vs {int(mine[w, t])}): another text or tokenizer")
