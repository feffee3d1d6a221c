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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from qpsa.eval.noise.embedding import EmbeddingNoiseResult, embedding_noise
from qpsa.eval.noise.settings import NoiseSettings
from qpsa.eval.noise.typos import TypoResult, typo_sensitivity
from qpsa.eval.perplexity import Windows
from qpsa.progress import Advance, no_progress

log = logging.getLogger(__name__)

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
    advance: Advance = no_progress, windows: Windows | None = None,
) -> NoiseReport:
    """Both parts on a loaded model (`qpsa.model.load.LoadedModel`) and an `EvalText`; `windows`
    are the text's windows for settings.ctx and settings.chunks when the caller has made them."""
    from qpsa.eval.perplexity import make_windows

    start = time.perf_counter()
    s = settings
    if windows is None:
        windows = make_windows(loaded.tokenizer, eval_text.text, s.ctx, s.chunks, None, loaded.config.context_length)
    embedding = embedding_noise(loaded.model, windows, s.sigmas, s.samples, s.seed, advance)
    typos = typo_sensitivity(loaded.model, loaded.tokenizer, prompts, s.typo_rate, s.samples, s.seed,
                             s.new_tokens, advance)
    log.info("noise: %d windows × %d σ × %d samples in %.1f s; %d prompts in %.1f s", windows.tokens.shape[0],
             len(s.sigmas), s.samples, embedding.seconds, len(prompts), typos.seconds)
    return NoiseReport(
        model=loaded.describe(),
        text={**eval_text.describe(), "windows": windows.description},
        settings={**asdict(s), "prompts": prompts_source},
        embedding=embedding, typos=typos, seconds=time.perf_counter() - start,
    )
