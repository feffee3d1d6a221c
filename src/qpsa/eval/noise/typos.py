"""Typos in prompts: seeded keyboard-neighbour edits, KL divergence and top-1 flips at the last prompt
position, and greedy continuations side by side (see `qpsa.eval.noise.run`)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qpsa.errors import QpsaError
from qpsa.eval.generation import greedy
from qpsa.eval.noise.embedding import compare_logits
from qpsa.eval.noise.settings import TYPO_STREAM, prompt_groups
from qpsa.eval.noise.summary import Summary, _pct, describe, draw_seed
from qpsa.model.tokenizer import Tokenizer
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress

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


def typo_sensitivity(
    model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], rate: float, samples: int, seed: int,
    new_tokens: int = 12, advance: Advance = no_progress,
) -> TypoResult:
    """Typos in prompts against the clean prompts (see `add_typos` and the module docstring).
    `advance` is called after every greedy step of every group of prompts (`prompt_groups`)."""
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

    typos = [[add_typos(prompt, rate, random.Random(draw_seed(seed, TYPO_STREAM, p, k))) for k in range(samples)]
             for p, prompt in enumerate(prompts)]
    results = []
    for group in prompt_groups(len(prompts), samples):
        # each distinct text once: the clean prompts, then the typo'd ones that differ from them
        texts = list(dict.fromkeys([prompts[p] for p in group] + [t for p in group for t, _ in typos[p]]))
        ids = [encode(t) for t in texts]
        logits, conts = greedy(model, ids, new_tokens, advance=advance)  # (len(texts), V)
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
