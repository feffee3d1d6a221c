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
import math
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.eval.perplexity import Windows
from qpsa.fsutil import user_file
from qpsa.model.transformer import Transformer

CLIP_NATS = 16.0  # llama.cpp stores log-probs down to 16 nats below the top, and sums KLD over log p > −16
LEVELS = 65535  # uint16 codes
ROWS_PER_STEP = 64  # positions processed at once in token_stats (bounds memory on large vocabularies)

# llama.cpp's percentile lines, in its order: (label, fraction); None marks min/max/median
KLD_QUANTILES = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
                 ("Median", None), ("10.0%", 0.1), ("5.0%", 0.05), ("1.0%", 0.01), ("0.1%", 0.001), ("Minimum", 0.0))
P_DIFF_QUANTILES = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
                    ("75.0%", 0.75), ("Median", None), ("25.0%", 0.25), ("10.0%", 0.1), ("5.0%", 0.05),
                    ("1.0%", 0.01), ("0.1%", 0.001), ("Minimum", 0.0))


# ---- the stored base: llama.cpp's uint16 log-probs -----------------------------------------------


def row_width(n_vocab: int) -> int:
    """uint16 values per stored position: 4 (float32 step and floor) + V codes, padded to even V."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_log_probs(logits: torch.Tensor) -> np.ndarray:
    """Base logits (S, V) -> stored rows (S, row_width(V)) uint16, llama.cpp's layout and rounding."""
    x = logits.float()  # (S, V)
    S, V = x.shape
    top = x.max(dim=-1).values  # (S,)
    clip = torch.maximum(x.min(dim=-1).values, top - CLIP_NATS)  # (S,)
    log_sum_exp = torch.exp(x - top[:, None]).double().sum(dim=-1).log().float()  # (S,)
    floor = (clip - top) - log_sum_exp  # (S,) the log-prob that code 0 stands for
    step = (top - clip) / LEVELS  # (S,)
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    codes = torch.round((x - clip[:, None]) * inv[:, None])  # (S, V), half to even like llama.cpp's nearest_int
    codes = torch.where(x > clip[:, None], codes, torch.zeros_like(codes)).clamp_(0, LEVELS)
    rows = np.zeros((S, row_width(V)), dtype=np.uint16)
    rows[:, :4] = np.stack([step.numpy(), floor.numpy()], axis=1).astype("<f4").view("<u2")  # (S, 4)
    rows[:, 4 : 4 + V] = codes.to(torch.int32).numpy().astype(np.uint16)
    return rows


def decode_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """Stored rows (S, row_width(V)) -> base log-probs (S, V) float32, as llama.cpp reads them."""
    rows = np.asarray(rows)
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")  # (S, 2): step, floor
    step = torch.from_numpy(head[:, 0].astype(np.float32))
    floor = torch.from_numpy(head[:, 1].astype(np.float32))
    codes = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.int32)).float()  # (S, V)
    return step[:, None] * codes + floor[:, None]


# ---- per-token figures and their summary ------------------------------------------------------------


@dataclass
class TokenStats:
    """Per scored token (float64 arrays of equal length), in window order."""

    nll: np.ndarray  # −log q(target), the other model
    nll_base: np.ndarray  # −log p(target), the stored base
    kld: np.ndarray  # KL(p ‖ q), nats
    p_diff: np.ndarray  # q(target) − p(target)
    same_top: np.ndarray  # bool: argmax q == argmax p

    def __len__(self) -> int:
        return len(self.nll)

    @staticmethod
    def concat(parts: list[TokenStats]) -> TokenStats:
        return TokenStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("nll", "nll_base", "kld", "p_diff", "same_top")))


def token_stats(base_rows: np.ndarray, other_logits: torch.Tensor, targets) -> TokenStats:
    """llama.cpp's per-token figures from the stored base rows (S, ·), the other model's logits
    (S, V) and the target token ids (S,)."""
    S, V = other_logits.shape
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if base_rows.shape != (S, row_width(V)) or targets.shape != (S,):
        raise QpsaError(f"base rows {base_rows.shape}, other logits {(S, V)} and targets {tuple(targets.shape)} "
                        f"do not match (vocabulary {V} needs rows of {row_width(V)})")
    out = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")}
    with torch.inference_mode():
        for a in range(0, S, ROWS_PER_STEP):
            b = min(S, a + ROWS_PER_STEP)
            y = targets[a:b, None]  # (s, 1)
            log_p = decode_log_probs(base_rows[a:b], V)  # (s, V) float32
            q = other_logits[a:b].double()  # (s, V)
            log_q = q - torch.logsumexp(q, dim=-1, keepdim=True)  # (s, V)
            nll = -log_q.gather(-1, y)[:, 0]  # (s,)
            nll_base = -log_p.gather(-1, y)[:, 0].double()  # (s,)
            kept = log_p > -CLIP_NATS  # (s, V)
            lp = log_p.double()
            kld = torch.where(kept, lp.exp() * (lp - log_q), torch.zeros_like(lp)).sum(dim=-1)  # (s,)
            out["nll"].append(nll)
            out["nll_base"].append(nll_base)
            out["kld"].append(kld)
            out["p_diff"].append(torch.exp(-nll) - torch.exp(-nll_base))
            out["same_top"].append(other_logits[a:b].argmax(dim=-1) == log_p.argmax(dim=-1))
    return TokenStats(**{k: torch.cat(v).numpy() for k, v in out.items()})


def mean_and_se(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and sqrt((mean(x²) − mean²)/(n − 1)), 0 for n ≤ 10."""
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    mean = float(np.sum(x)) / n
    var = float(np.sum(x * x)) / n - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of the two means: (mean(ab) − mean(a)·mean(b)) / (n − 1), 0 for n < 10."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.sum(a * b)) / n - float(np.sum(a)) / n * (float(np.sum(b)) / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear between sorted[⌊f·(n−1)⌋] and the next value."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(sorted_values[n // 2] if n % 2 else 0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))


def quantiles(values: np.ndarray, table) -> dict[str, float]:
    v = np.sort(values)
    return {label: (median(v) if f is None else percentile(v, f)) for label, f in table}


@dataclass
class CompareStats:
    """llama.cpp's `--kl-divergence` summary. Probabilities (p_diff, same_top) are fractions, not %."""

    n_tokens: int
    ppl: float  # Mean PPL(Q)
    ppl_se: float
    ppl_base: float  # Mean PPL(base)
    ppl_base_se: float
    cor_ln_ppl: float | None  # Cor(ln(PPL(Q)), ln(PPL(base))), None where a standard error is 0
    ln_ratio: float  # Mean ln(PPL(Q)/PPL(base))
    ln_ratio_se: float
    ppl_ratio: float  # Mean PPL(Q)/PPL(base)
    ppl_ratio_se: float
    ppl_diff: float  # Mean PPL(Q)-PPL(base)
    ppl_diff_se: float
    kld: float  # Mean KLD, nats
    kld_se: float
    kld_quantiles: dict[str, float]
    p_diff: float  # Mean Δp
    p_diff_se: float
    p_diff_quantiles: dict[str, float]
    p_diff_rms: float  # RMS Δp
    p_diff_rms_se: float
    same_top: float  # Same top p
    same_top_se: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_stats(t: TokenStats) -> CompareStats:
    """The summary llama.cpp prints after `--kl-divergence`, from per-token figures."""
    n = len(t)
    if n < 2:
        raise QpsaError(f"{n} scored token(s): too few for statistics")
    ln_q, ln_q_se = mean_and_se(t.nll)
    ln_b, ln_b_se = mean_and_se(t.nll_base)
    cov = covariance_of_means(t.nll, t.nll_base)
    ppl, ppl_base = math.exp(ln_q), math.exp(ln_b)
    ln_ratio = ln_q - ln_b
    ln_ratio_se = math.sqrt(max(0.0, ln_q_se**2 + ln_b_se**2 - 2 * cov))
    ppl_diff_se = math.sqrt(max(0.0, (ppl * ln_q_se) ** 2 + (ppl_base * ln_b_se) ** 2 - 2 * ppl * ppl_base * cov))
    kld, kld_se = mean_and_se(t.kld)
    p_diff, p_diff_se = mean_and_se(t.p_diff)
    mse, mse_se = mean_and_se(t.p_diff**2)
    rms = math.sqrt(mse)
    same = float(np.mean(t.same_top))
    return CompareStats(
        n_tokens=n, ppl=ppl, ppl_se=ppl * ln_q_se, ppl_base=ppl_base, ppl_base_se=ppl_base * ln_b_se,
        cor_ln_ppl=cov / (ln_q_se * ln_b_se) if ln_q_se > 0 and ln_b_se > 0 else None,
        ln_ratio=ln_ratio, ln_ratio_se=ln_ratio_se,
        ppl_ratio=math.exp(ln_ratio), ppl_ratio_se=math.exp(ln_ratio) * ln_ratio_se,
        ppl_diff=ppl - ppl_base, ppl_diff_se=ppl_diff_se,
        kld=kld, kld_se=kld_se, kld_quantiles=quantiles(t.kld, KLD_QUANTILES),
        p_diff=p_diff, p_diff_se=p_diff_se, p_diff_quantiles=quantiles(t.p_diff, P_DIFF_QUANTILES),
        p_diff_rms=rms, p_diff_rms_se=0.5 / rms * mse_se if rms > 0 else 0.0,
        same_top=same, same_top_se=math.sqrt(same * (1 - same) / (n - 1)),
    )


def kld_stats(base_logits, other_logits, targets) -> CompareStats:
    """The whole computation on logits in memory: base (S, V) and other (S, V) logits, targets (S,)."""
    base_logits, other_logits = torch.as_tensor(base_logits), torch.as_tensor(other_logits)
    return compare_stats(token_stats(encode_log_probs(base_logits), other_logits, targets))


def running_line(t: TokenStats) -> dict:
    """llama.cpp's per-chunk line: PPL(Q), ln(PPL(Q)/PPL(base)), KLD, RMS Δp, same top p (each ±)."""
    s = compare_stats(t)
    return {"n_tokens": s.n_tokens, "ppl": s.ppl, "ppl_se": s.ppl_se, "ln_ratio": s.ln_ratio,
            "ln_ratio_se": s.ln_ratio_se, "kld": s.kld, "kld_se": s.kld_se, "p_diff_rms": s.p_diff_rms,
            "p_diff_rms_se": s.p_diff_rms_se, "same_top": s.same_top, "same_top_se": s.same_top_se}


# ---- the base file ----------------------------------------------------------------------------

# Layout (little-endian), llama.cpp's `--kl-divergence-base` file followed by a q-psa trailer:
#   b"_logits_"  uint32 ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk·ctx]
#   per window, per scored position (ctx − 1 − ctx/2 of them): uint16[row_width(n_vocab)] (see above)
#   trailer: JSON metadata (UTF-8), uint64 its length, b"QPSABASE"
MAGIC = b"_logits_"
TRAILER_MAGIC = b"QPSABASE"
FORMAT = "q-psa base log-probs 1 (llama.cpp kl-divergence-base layout + JSON trailer)"
_HEAD = struct.Struct("<8sIii")


class BaseLogProbsWriter:
    """Writes a base file window by window into a temporary file beside `path`; `finish(meta)`
    appends the trailer and renames it over `path`, so a reader never sees a partial file."""

    def __init__(self, path, windows: Windows, n_vocab: int):
        self.path = Path(path)
        N, T = windows.tokens.shape
        if windows.score_from != T // 2:
            raise QpsaError("a base file needs llama.cpp's windows (second half scored), not --max-tokens")
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "wb")
        self.f.write(_HEAD.pack(MAGIC, T, n_vocab, N))
        self.f.write(windows.tokens.numpy().astype("<i4").tobytes())

    def write(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())

    def finish(self, meta: dict) -> Path:
        blob = json.dumps(meta, indent=1).encode("utf-8")
        self.f.write(blob + struct.pack("<Q", len(blob)) + TRAILER_MAGIC)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        Path(self.tmp).unlink(missing_ok=True)


@dataclass
class BaseLogProbsFile:
    """A base file opened for reading: validated sizes, the windows' tokens, rows mapped lazily."""

    path: Path
    ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (N, T) int32
    meta: dict | None  # the q-psa trailer; None for a file llama.cpp wrote
    _rows: np.ndarray = field(repr=False)  # (N, S, row_width) uint16, memory-mapped

    @property
    def n_scored(self) -> int:
        return self.ctx - 1 - self.ctx // 2

    def rows(self, i: int) -> np.ndarray:
        return np.asarray(self._rows[i])  # (S, row_width)

    @staticmethod
    def open(path) -> BaseLogProbsFile:
        path = Path(path)
        with user_file(path, "base file"):
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(_HEAD.size)
        if len(head) < _HEAD.size or head[:8] != MAGIC:
            raise QpsaError(f"{path}: not a base log-probs file (it does not start with {MAGIC.decode()!r})")
        _, ctx, n_vocab, n_chunk = _HEAD.unpack(head)
        if ctx < 4 or n_vocab < 1 or n_chunk < 1 or ctx > 1 << 24 or n_vocab > 1 << 24:
            raise QpsaError(f"{path}: bad header (ctx {ctx}, vocabulary {n_vocab}, chunks {n_chunk})")
        data_at = _HEAD.size + 4 * n_chunk * ctx
        n_scored = ctx - 1 - ctx // 2
        end = data_at + 2 * n_chunk * n_scored * row_width(n_vocab)
        if size < end:
            raise QpsaError(f"{path}: truncated: {size:,} bytes, {ctx}×{n_chunk} windows over a vocabulary of "
                            f"{n_vocab} need {end:,}")
        meta = _read_trailer(path, size, end)
        tokens = np.fromfile(path, dtype="<i4", count=n_chunk * ctx, offset=_HEAD.size).reshape(n_chunk, ctx)
        rows = np.memmap(path, dtype="<u2", mode="r", offset=data_at, shape=(n_chunk, n_scored, row_width(n_vocab)))
        return BaseLogProbsFile(path, ctx, n_vocab, n_chunk, tokens, meta, rows)


def _read_trailer(path: Path, size: int, end: int) -> dict | None:
    if size == end:
        return None  # llama.cpp's own file: no q-psa metadata
    with path.open("rb") as f:
        f.seek(size - 16)
        length, magic = struct.unpack("<Q8s", f.read(16))
        if magic != TRAILER_MAGIC or end + length + 16 != size:
            raise QpsaError(f"{path}: {size - end:,} unexpected bytes after the log-probs (not a q-psa trailer)")
        f.seek(end)
        try:
            meta = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise QpsaError(f"{path}: damaged metadata trailer: {e}") from None
    if not isinstance(meta, dict):
        raise QpsaError(f"{path}: damaged metadata trailer: not a JSON object")
    return meta


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
    on_base: Callable[[int, int], None] | None = None,
    on_other: Callable[[int, int, dict], None] | None = None,
) -> CompareRun:
    """Run the base (or read its stored rows) and the other model window by window, interleaved,
    so memory holds one window at a time. `on_base(done, total)` and `on_other(done, total, line)`
    report progress; `line` is llama.cpp's running per-chunk figures."""
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
            if on_base:
                on_base(i + 1, N)
        t1 = time.perf_counter()
        parts.append(token_stats(rows, scored_logits(other, window, sf), window[sf + 1 :]))
        line = {"window": i + 1, **running_line(TokenStats.concat(parts))}
        running.append(line)
        other_seconds += time.perf_counter() - t1
        if on_other:
            on_other(i + 1, N, line)
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
