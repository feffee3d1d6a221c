"""The noise command's settings and defaults: the σ values, typo rate, samples and prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qpsa.errors import QpsaError

DEFAULT_SIGMAS = (0.01, 0.03, 0.1)

NOISE_STREAM = 0  # seed stream of the embedding noise
TYPO_STREAM = 1  # seed stream of the typos

GREEDY_ROWS = 32  # sequences per batched greedy run


def prompt_groups(n_prompts: int, samples: int) -> list[range]:
    """Prompts whose clean and typo'd versions share one batched greedy run (up to GREEDY_ROWS rows)."""
    g = max(1, GREEDY_ROWS // (1 + samples))
    return [range(a, min(a + g, n_prompts)) for a in range(0, n_prompts, g)]


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
