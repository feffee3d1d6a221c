"""Gaussian noise on the input embeddings: KL divergence, top-1 flips, PPL ratio and the relative
hidden-state perturbation at every depth, against the clean run on the same windows (see `qpsa.eval.noise.run`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qpsa.eval.noise.settings import NOISE_STREAM
from qpsa.eval.noise.summary import Summary, _pct, describe, draw_seed
from qpsa.eval.perplexity import Windows, ppl_from_nll
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress
from qpsa.stats import mean_se

# ---- 1. embedding noise -----------------------------------------------------------------------


@dataclass
class LayerPerturbation:
    depth: int  # 0 = the embeddings, d = after d layers (the output of blk.{d-1})
    rel: float  # mean over tokens of ‖h̃_d − h_d‖ / ‖h_d‖
    rel_se: float
    amplification: float  # rel / rel at depth 0, paired over the same tokens
    amplification_se: float  # delta method on the paired per-token values


@dataclass
class SigmaResult:
    sigma: float
    kl: Summary  # KL(clean ‖ noisy) per scored token, nats
    flip_pct: float  # % of scored positions whose top-1 token changes
    flip_pct_se: float
    ppl: float  # perplexity under noise on the scored tokens
    ppl_se: float
    delta_ppl: float  # ppl − clean ppl
    ppl_ratio: float  # exp(mean ΔNLL), paired over the same tokens
    ppl_ratio_se: float
    layers: list[LayerPerturbation]  # depth 0 … n_layer

    @property
    def input_rel(self) -> float:
        return self.layers[0].rel

    @property
    def output_rel(self) -> float:
        return self.layers[-1].rel


@dataclass
class EmbeddingNoiseResult:
    windows: str  # how the text was windowed
    n_windows: int
    ctx: int
    n_scored: int  # scored tokens per pass over all windows
    samples: int
    rms: list[float]  # RMS(E) of each window
    clean_ppl: float
    clean_ppl_se: float
    sigmas: list[SigmaResult]
    seconds: float = 0.0


class _Accumulator:
    """Per-token values of one σ, gathered over windows and samples."""

    def __init__(self, n_depth: int):
        self.kl, self.flip, self.dnll, self.nll = [], [], [], []
        self.rel: list[list[torch.Tensor]] = [[] for _ in range(n_depth)]

    def result(self, sigma: float, clean_nll: float) -> SigmaResult:
        kl, flip, dnll, nll = (torch.cat(v) for v in (self.kl, self.flip, self.dnll, self.nll))
        ppl, ppl_se, _, _ = ppl_from_nll(nll)
        mean_d, se_d = mean_se(dnll)
        ratio = math.exp(mean_d)
        base = torch.cat(self.rel[0])  # (n,)
        b = float(base.mean())
        layers = []
        for d, parts in enumerate(self.rel):
            r = torch.cat(parts)
            mean, se = mean_se(r)
            amp = mean / b
            _, amp_se = mean_se(r - amp * base)  # se of the ratio of paired means, × b
            layers.append(LayerPerturbation(d, mean, se, amp, amp_se / b))
        flip_pct, flip_se = _pct(flip)
        return SigmaResult(sigma, describe(kl), flip_pct, flip_se, ppl, ppl_se, ppl - math.exp(clean_nll),
                           ratio, ratio * se_d, layers)


def embedding_noise(
    model: Transformer, windows: Windows, sigmas: Sequence[float], samples: int, seed: int,
    advance: Advance = no_progress,
) -> EmbeddingNoiseResult:
    """Gaussian noise on the input embeddings (see the module docstring for every definition)."""
    start = time.perf_counter()
    n_win, T = windows.tokens.shape
    s0, L = windows.score_from, model.config.n_layer
    positions = torch.arange(T)
    acc = {sigma: _Accumulator(L + 1) for sigma in sigmas}
    clean_nlls, rms_list = [], []
    with torch.inference_mode():
        for w in range(n_win):
            targets = windows.tokens[w, s0 + 1 :]  # (S,)
            e = model.embed(windows.tokens[w][None])  # (1, T, C)
            rms = float(e.double().pow(2).mean().sqrt())
            rms_list.append(rms)
            clean = [e]
            for i in range(L):
                clean.append(model.block(i, clean[-1], positions))  # (1, T, C) after i+1 layers
            clean_norms = [h[0].double().norm(dim=-1).clamp_min(1e-30) for h in clean]  # (T,) each
            clean_logits = model.logits(clean[-1][:, s0:-1])[0]  # (S, V)
            noisy_logits = torch.empty_like(clean_logits)[None]  # (1, S, V), reused
            clean_nll = None
            advance(f"window {w + 1}/{n_win} clean")
            for k in range(samples):
                g = torch.Generator().manual_seed(draw_seed(seed, NOISE_STREAM, w, k))
                z = torch.randn(e.shape, generator=g, dtype=e.dtype)  # (1, T, C), shared by every σ
                for sigma in sigmas:
                    a = acc[sigma]
                    h = e + (sigma * rms) * z
                    a.rel[0].append(_relative(h, clean[0], clean_norms[0]))
                    for i in range(L):
                        h = model.block(i, h, positions)
                        a.rel[i + 1].append(_relative(h, clean[i + 1], clean_norms[i + 1]))
                    model.logits(h[:, s0:-1], out=noisy_logits)
                    kl, flip, nll_c, nll_n = compare_logits(clean_logits, noisy_logits[0], targets)
                    clean_nll = nll_c
                    a.kl.append(kl)
                    a.flip.append(flip)
                    a.dnll.append(nll_n - nll_c)
                    a.nll.append(nll_n)
                    advance(f"σ={sigma:g} KL {float(kl.mean()):.3g}")
            if clean_nll is None:
                clean_nll = compare_logits(clean_logits, clean_logits, targets)[2]
            clean_nlls.append(clean_nll)
    all_clean = torch.cat(clean_nlls)
    clean_ppl, clean_ppl_se, clean_mean_nll, _ = ppl_from_nll(all_clean)
    return EmbeddingNoiseResult(
        windows=windows.description, n_windows=n_win, ctx=T, n_scored=windows.n_scored, samples=samples,
        rms=rms_list, clean_ppl=clean_ppl, clean_ppl_se=clean_ppl_se,
        sigmas=[acc[s].result(s, clean_mean_nll) for s in sigmas], seconds=time.perf_counter() - start,
    )


def _relative(h: torch.Tensor, clean: torch.Tensor, clean_norm: torch.Tensor) -> torch.Tensor:
    """‖h − clean‖ / ‖clean‖ per token, (1, T, C) -> (T,) float64."""
    return (h - clean)[0].double().norm(dim=-1) / clean_norm


def compare_logits(
    clean: torch.Tensor, other: torch.Tensor, targets: torch.Tensor | None = None, rows: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per position of logits (S, V): KL(clean ‖ other) in nats and top-1 flips, and where
    `targets` (S,) are given the NLL of each target under both; float64 from log_softmax,
    `rows` positions at a time to bound memory on large vocabularies."""
    kl, flip, nll_c, nll_o = [], [], [], []
    for a in range(0, clean.shape[0], rows):
        lp = torch.log_softmax(clean[a : a + rows].double(), dim=-1)  # (r, V)
        lq = torch.log_softmax(other[a : a + rows].double(), dim=-1)  # (r, V)
        kl.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0))
        flip.append(lp.argmax(-1) != lq.argmax(-1))
        if targets is not None:
            t = targets[a : a + rows, None]  # (r, 1)
            nll_c.append(-lp.gather(-1, t)[:, 0])
            nll_o.append(-lq.gather(-1, t)[:, 0])
    if targets is None:
        return torch.cat(kl), torch.cat(flip), None, None
    return torch.cat(kl), torch.cat(flip), torch.cat(nll_c), torch.cat(nll_o)
