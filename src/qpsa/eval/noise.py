"""Input sensitivity: how far a model's outputs move when its input is slightly wrong.

Two seeded perturbations, each compared with the clean run on the same input (docs/noise.md):

1. **Gaussian noise on the input embeddings** (`embedding_noise`), on windows of the evaluation
   text cut as for perplexity (`qpsa.eval.perplexity.make_windows`: ctx tokens, BOS first where
   the vocabulary adds it, second half scored). For window w, let E (1, T, C) be its embedded
   tokens as the first layer sees them (after any embedding scale, e.g. Gemma's √C) and

       RMS(E) = sqrt( mean over all T·C entries of E² ).

   Draw z ~ N(0, 1) of E's shape and run all layers on Ẽ = E + σ·RMS(E)·z (every position, BOS
   included). The same z serves every σ of a window and sample (common random numbers), so the σ
   curve is a paired comparison. Measured on the scored positions (logits at ctx/2 … ctx−2):

   * KL(clean ‖ noisy) = Σ_v p(v) (log p(v) − log p̃(v)) per position, in nats, from
     float64 log_softmax of the logits;
   * top-1 flip: the share of positions whose argmax changes, in %;
   * the PPL ratio exp(mean(NLL_noisy − NLL_clean)) on the text's own next tokens;

   and at every position t and depth d (0 = the embeddings, d = after d layers, i.e. the output
   of `blk.{d-1}`) the relative hidden-state perturbation r_d(t) = ‖h̃_d(t) − h_d(t)‖ / ‖h_d(t)‖
   (norms over the C channels), over all T positions. Its mean over tokens is the per-layer
   curve. At depth 0, r_0(t) = σ·RMS(E)·‖z_t‖ / ‖E_t‖ ≈ σ·RMS(E)/RMS(E_t) since ‖z_t‖ ≈ √C: about
   σ, a little more where token embeddings differ in size. The amplification at depth d is
   mean(r_d) / mean(r_0), paired over the same tokens.

2. **Typos in prompts** (`typo_sensitivity`): each ASCII letter of a prompt is, independently
   with probability `rate`, edited in one of four ways chosen uniformly (`add_typos`). The
   prompt is tokenized as plain text (BOS first where the vocabulary adds it; no chat template).
   Measured at the last prompt position: KL(clean ‖ typo) and whether the top-1 token flips, and
   the greedy continuations of both prompts side by side.

Every mean comes with its standard error sqrt(var / (n − 1)) (population variance), over scored
tokens × windows × samples for the noise, over prompts × samples for the typos. Like
perplexity's ±, it treats these units as independent, which tokens of one window are not
quite, so it understates the true uncertainty somewhat.

Seeds: every draw has its own generator, seeded from (seed, part, window or prompt, sample) by
numpy's SeedSequence, so a result does not depend on which other σ or prompts were asked for.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from qpsa.errors import QpsaError
from qpsa.eval.perplexity import Windows, summarize
from qpsa.model.tokenizer import Tokenizer
from qpsa.model.transformer import Transformer

log = logging.getLogger(__name__)

DEFAULT_SIGMAS = (0.01, 0.03, 0.1)
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "What language is spoken in Brazil?",
    "At what temperature does water boil at sea level?",
)

_NOISE, _TYPOS = 0, 1  # seed streams


@dataclass(frozen=True)
class NoiseSettings:
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS  # noise std relative to RMS(embeddings), ascending
    typo_rate: float = 0.05  # probability that a letter is edited
    samples: int = 1  # noise draws per window and σ; typo draws per prompt
    seed: int = 42
    ctx: int = 512
    chunks: int = 4
    new_tokens: int = 12  # greedy continuation length for the typo comparison

    def __post_init__(self):
        for s in self.sigmas:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
                raise QpsaError(f"--sigma must be a positive number (got {s})")
        if not self.sigmas:
            raise QpsaError("--sigma needs at least one value")
        object.__setattr__(self, "sigmas", tuple(sorted({float(s) for s in self.sigmas})))
        if not (math.isfinite(self.typo_rate) and 0 < self.typo_rate <= 1):
            raise QpsaError(f"--typo-rate must be in (0, 1] (got {self.typo_rate})")
        for name in ("samples", "ctx", "chunks", "new_tokens"):
            v = getattr(self, name)
            if v <= 0:
                raise QpsaError(f"--{name.replace('_', '-')} must be a positive number (got {v})")
        if self.seed < 0:
            raise QpsaError(f"--seed must be zero or more (got {self.seed})")

    def passes(self, n_windows: int, n_prompts: int) -> int:
        """Steps the progress bar counts: one clean and samples·len(σ) noisy passes per window, and
        new_tokens greedy steps per group of prompts (clean and typo'd together, `prompt_groups`)."""
        return (n_windows * (1 + self.samples * len(self.sigmas))
                + len(prompt_groups(n_prompts, self.samples)) * self.new_tokens)


# ---- statistics -----------------------------------------------------------------------------


@dataclass
class Summary:
    """A distribution over units (tokens, or prompt draws): mean ± standard error and its tail."""

    mean: float
    se: float
    median: float
    p99: float
    max: float
    n: int


def describe(x: torch.Tensor) -> Summary:
    x = x.double().flatten()
    n = x.numel()
    mean, se = _mean_se(x)
    a = x.numpy()
    return Summary(mean, se, float(np.median(a)), float(np.percentile(a, 99)), float(a.max()), n)


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    var = float(((x - mean) ** 2).mean())
    return mean, math.sqrt(var / (n - 1)) if n > 1 else 0.0


def _pct(flags: torch.Tensor) -> tuple[float, float]:
    """(share in %, its standard error in %) of a boolean tensor."""
    mean, se = _mean_se(flags.double())
    return 100 * mean, 100 * se


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


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
        ppl, ppl_se, _, _ = summarize(nll)
        mean_d, se_d = _mean_se(dnll)
        ratio = math.exp(mean_d)
        base = torch.cat(self.rel[0])  # (n,)
        b = float(base.mean())
        layers = []
        for d, parts in enumerate(self.rel):
            r = torch.cat(parts)
            mean, se = _mean_se(r)
            amp = mean / b
            _, amp_se = _mean_se(r - amp * base)  # se of the ratio of paired means, × b
            layers.append(LayerPerturbation(d, mean, se, amp, amp_se / b))
        flip_pct, flip_se = _pct(flip)
        return SigmaResult(sigma, describe(kl), flip_pct, flip_se, ppl, ppl_se, ppl - math.exp(clean_nll),
                           ratio, ratio * se_d, layers)


def embedding_noise(
    model: Transformer, windows: Windows, sigmas: Sequence[float], samples: int, seed: int,
    progress: Callable[[str], None] | None = None,
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
            if progress:
                progress(f"window {w + 1}/{n_win} clean")
            for k in range(samples):
                g = torch.Generator().manual_seed(_seed(seed, _NOISE, w, k))
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
                    if progress:
                        progress(f"σ={sigma:g} KL {float(kl.mean()):.3g}")
            if clean_nll is None:
                clean_nll = compare_logits(clean_logits, clean_logits, targets)[2]
            clean_nlls.append(clean_nll)
    all_clean = torch.cat(clean_nlls)
    clean_ppl, clean_ppl_se, clean_mean_nll, _ = summarize(all_clean)
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


# ---- 2. typos ---------------------------------------------------------------------------------

QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
TYPO_EDITS = ("substitute", "delete", "duplicate", "swap")


def _qwerty_neighbours() -> dict[str, str]:
    """Keys touching each letter on a QWERTY keyboard (each row sits half a key right of the one
    above): same row left/right, the two keys above, the two below."""
    out = {}
    for r, row in enumerate(QWERTY_ROWS):
        for c, ch in enumerate(row):
            near = ((r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c))
            out[ch] = "".join(QWERTY_ROWS[i][j] for i, j in near if 0 <= i < 3 and 0 <= j < len(QWERTY_ROWS[i]))
    return out


QWERTY_NEIGHBOURS = _qwerty_neighbours()


def add_typos(text: str, rate: float, rng: random.Random) -> tuple[str, int]:
    """(text with typos, number of edits). Left to right, each ASCII letter is edited with
    probability `rate`, by one of TYPO_EDITS chosen uniformly:

    * substitute: a QWERTY neighbour, same case ("a" -> one of "qwsz");
    * delete it;
    * duplicate it ("cat" -> "caat");
    * swap it with the next character when that is a different ASCII letter ("form" -> "from");
      the swapped-in letter gets no draw of its own. With no such neighbour: substitute.

    A deletion that would leave the text empty becomes a substitution. Other characters
    (spaces, digits, punctuation, non-ASCII letters) are never edited.
    """
    out, i, edits = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch.lower() not in QWERTY_NEIGHBOURS or not ch.isascii() or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        edits += 1
        kind = rng.choice(TYPO_EDITS)
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if kind == "swap" and not (nxt.isascii() and nxt.lower() in QWERTY_NEIGHBOURS and nxt != ch):
            kind = "substitute"
        if kind == "delete" and not out and i == len(text) - 1:
            kind = "substitute"
        if kind == "substitute":
            sub = rng.choice(QWERTY_NEIGHBOURS[ch.lower()])
            out.append(sub.upper() if ch.isupper() else sub)
        elif kind == "duplicate":
            out.append(ch + ch)
        elif kind == "swap":
            out.append(nxt + ch)
            i += 1
        i += 1
    return "".join(out), edits


@dataclass
class TypoDraw:
    sample: int
    text: str  # the prompt with typos
    n_edits: int
    n_tokens: int
    kl: float  # KL(clean ‖ typo) of the next-token distributions at the last prompt position, nats
    top1: str  # the typo'd prompt's most likely next token
    flip: bool  # top1 differs from the clean prompt's
    continuation: str  # greedy, new_tokens tokens (EOS does not stop it)
    same_continuation: bool


@dataclass
class PromptTypos:
    prompt: str
    n_tokens: int  # BOS included where the vocabulary adds it
    top1: str
    continuation: str
    draws: list[TypoDraw]


@dataclass
class TypoResult:
    rate: float
    samples: int
    new_tokens: int
    bos: bool  # whether prompts start with BOS
    prompts: list[PromptTypos]
    kl: Summary  # over prompts × samples
    flip_pct: float
    flip_pct_se: float
    same_continuation_pct: float
    same_continuation_pct_se: float
    unchanged_draws: int  # draws where no letter was edited (KL 0 by construction)
    mean_edits: float
    seconds: float = 0.0


GREEDY_ROWS = 32  # sequences per batched greedy run


def prompt_groups(n_prompts: int, samples: int) -> list[range]:
    """Prompts whose clean and typo'd versions share one batched greedy run (up to GREEDY_ROWS rows)."""
    g = max(1, GREEDY_ROWS // (1 + samples))
    return [range(a, min(a + g, n_prompts)) for a in range(0, n_prompts, g)]


def greedy(
    model: Transformer, prompts: Sequence[Sequence[int]], n: int, progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """(logits (B, V) at the last position of each prompt, n greedily chosen next tokens per
    prompt). EOS is a token like any other, not a stop. The prompts run as one batch, padded on
    the right: attention is causal, so a position never sees the padding after it. No cache:
    each step re-runs the whole batch, cheap for short prompts. `progress` is called per step."""
    seqs = [list(ids) for ids in prompts]
    B, first = len(seqs), None
    with torch.inference_mode():
        for step in range(n):
            lengths = torch.tensor([len(x) for x in seqs])  # (B,)
            T = int(lengths.max())
            tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T), right-padded with token 0
            for i, x in enumerate(seqs):
                tokens[i, : len(x)] = torch.tensor(x)
            h = model.run_layers(model.embed(tokens), range(model.config.n_layer), torch.arange(T))  # (B, T, C)
            logits = model.logits(h[torch.arange(B), lengths - 1][:, None])[:, 0]  # (B, V)
            if first is None:
                first = logits.clone()
            for x, t in zip(seqs, logits.argmax(-1).tolist()):
                x.append(t)
            if progress:
                progress(f"greedy step {step + 1}/{n}, {B} prompts")
    return first, [x[len(ids):] for x, ids in zip(seqs, prompts)]


def typo_sensitivity(
    model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], rate: float, samples: int, seed: int,
    new_tokens: int = 12, progress: Callable[[str], None] | None = None,
) -> TypoResult:
    """Typos in prompts against the clean prompts (see `add_typos` and the module docstring).
    `progress` is called after every greedy step of every group of prompts (`prompt_groups`)."""
    start = time.perf_counter()
    limit = model.config.context_length
    bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None)

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text, bos=bos)
        if not ids:
            raise QpsaError(f"prompt {text!r} has no tokens")
        if limit and len(ids) + new_tokens > limit:
            raise QpsaError(f"prompt {text[:40]!r}… has {len(ids)} tokens; with {new_tokens} new tokens that "
                            f"exceeds the model's context length {limit}")
        return ids

    typos = [[add_typos(prompt, rate, random.Random(_seed(seed, _TYPOS, p, k))) for k in range(samples)]
             for p, prompt in enumerate(prompts)]
    results = []
    for group in prompt_groups(len(prompts), samples):
        # each distinct text once: the clean prompts, then the typo'd ones that differ from them
        texts = list(dict.fromkeys([prompts[p] for p in group] + [t for p in group for t, _ in typos[p]]))
        ids = [encode(t) for t in texts]
        logits, conts = greedy(model, ids, new_tokens, progress)  # (len(texts), V)
        row = {t: i for i, t in enumerate(texts)}
        top1 = logits.argmax(-1).tolist()
        for p in group:
            c = row[prompts[p]]
            draws = []
            for k, (text, n_edits) in enumerate(typos[p]):
                j = row[text]  # j == c: nothing changed, the clean run itself (KL 0, no flip)
                kl, flip, _, _ = compare_logits(logits[c : c + 1], logits[j : j + 1])
                draws.append(TypoDraw(k, text, n_edits, len(ids[j]), float(kl[0]), tokenizer.decode([top1[j]]),
                                      bool(flip[0]), tokenizer.decode(conts[j]), conts[j] == conts[c]))
            results.append(PromptTypos(prompts[p], len(ids[c]), tokenizer.decode([top1[c]]),
                                       tokenizer.decode(conts[c]), draws))
    draws = [d for r in results for d in r.draws]
    flip_pct, flip_se = _pct(torch.tensor([d.flip for d in draws]))
    same_pct, same_se = _pct(torch.tensor([d.same_continuation for d in draws]))
    return TypoResult(
        rate=rate, samples=samples, new_tokens=new_tokens, bos=bos, prompts=results,
        kl=describe(torch.tensor([d.kl for d in draws], dtype=torch.float64)), flip_pct=flip_pct,
        flip_pct_se=flip_se, same_continuation_pct=same_pct, same_continuation_pct_se=same_se,
        unchanged_draws=sum(d.n_edits == 0 for d in draws), mean_edits=sum(d.n_edits for d in draws) / len(draws),
        seconds=time.perf_counter() - start,
    )


def read_prompts(path: str) -> list[str]:
    """Prompts from a UTF-8 file, one per line; blank lines are skipped, each line is stripped."""
    from qpsa.sources.texts import text_from_file

    text = text_from_file(path).text  # QpsaError for a missing, empty, binary or non-UTF-8 file
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QpsaError(f"{path}: no prompts (every line is blank)")
    return prompts


# ---- the whole report -------------------------------------------------------------------------


@dataclass
class NoiseReport:
    model: dict  # name, path, sha256, architecture, n_layer
    text: dict  # name, source, sha256, chars, windows
    settings: dict  # NoiseSettings plus where the prompts came from
    embedding: EmbeddingNoiseResult
    typos: TypoResult
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_noise(
    loaded, eval_text, prompts: Sequence[str], settings: NoiseSettings, prompts_source: str = "built-in",
    progress: Callable[[str], None] | None = None, windows: Windows | None = None,
) -> NoiseReport:
    """Both parts on a loaded model (`qpsa.model.load.LoadedModel`) and an `EvalText`; `windows`
    are the text's windows for settings.ctx and settings.chunks when the caller has made them."""
    from qpsa.eval.perplexity import make_windows

    start = time.perf_counter()
    s = settings
    if windows is None:
        windows = make_windows(loaded.tokenizer, eval_text.text, s.ctx, s.chunks, None, loaded.config.context_length)
    embedding = embedding_noise(loaded.model, windows, s.sigmas, s.samples, s.seed, progress)
    typos = typo_sensitivity(loaded.model, loaded.tokenizer, prompts, s.typo_rate, s.samples, s.seed,
                             s.new_tokens, progress)
    log.info("noise: %d windows × %d σ × %d samples in %.1f s; %d prompts in %.1f s", windows.tokens.shape[0],
             len(s.sigmas), s.samples, embedding.seconds, len(prompts), typos.seconds)
    return NoiseReport(
        model={"name": loaded.name, "path": str(loaded.path), "sha256": loaded.file.sha256,
               "architecture": loaded.config.arch, "n_layer": loaded.config.n_layer},
        text={**eval_text.describe(), "windows": windows.description},
        settings={**asdict(s), "prompts": prompts_source},
        embedding=embedding, typos=typos, seconds=time.perf_counter() - start,
    )
