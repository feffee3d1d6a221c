"""Per-token figures of two models on the same tokens (KL divergence, Δp, same top token, NLLs) and
their summary as llama.cpp's `--kl-divergence` prints it (see `qpsa.eval.compare.run`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.eval.compare.logprobs import CLIP_NATS, decode_log_probs, encode_log_probs, row_width
from qpsa.stats import llamacpp_covariance_of_means, llamacpp_mean_se

ROWS_PER_STEP = 64  # positions processed at once in token_stats (bounds memory on large vocabularies)
KLD_MIN_N = 11  # llama.cpp's --kl-divergence prints ± 0 below this many tokens
KLD_QUANTILES = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
                 ("Median", None), ("10.0%", 0.1), ("5.0%", 0.05), ("1.0%", 0.01), ("0.1%", 0.001), ("Minimum", 0.0))
P_DIFF_QUANTILES = (("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
                    ("75.0%", 0.75), ("Median", None), ("25.0%", 0.25), ("10.0%", 0.1), ("5.0%", 0.05),
                    ("1.0%", 0.01), ("0.1%", 0.001), ("Minimum", 0.0))


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
    return TokenStats(**{k: torch.cat(v).cpu().numpy() for k, v in out.items()})


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
    ln_q, ln_q_se = llamacpp_mean_se(t.nll, min_n=KLD_MIN_N)
    ln_b, ln_b_se = llamacpp_mean_se(t.nll_base, min_n=KLD_MIN_N)
    cov = llamacpp_covariance_of_means(t.nll, t.nll_base)
    ppl, ppl_base = math.exp(ln_q), math.exp(ln_b)
    ln_ratio = ln_q - ln_b
    ln_ratio_se = math.sqrt(max(0.0, ln_q_se**2 + ln_b_se**2 - 2 * cov))
    ppl_diff_se = math.sqrt(max(0.0, (ppl * ln_q_se) ** 2 + (ppl_base * ln_b_se) ** 2 - 2 * ppl * ppl_base * cov))
    kld, kld_se = llamacpp_mean_se(t.kld, min_n=KLD_MIN_N)
    p_diff, p_diff_se = llamacpp_mean_se(t.p_diff, min_n=KLD_MIN_N)
    mse, mse_se = llamacpp_mean_se(t.p_diff**2, min_n=KLD_MIN_N)
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
