"""Distributions over tokens or prompt draws: mean ± standard error and the tail, and per-draw seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qpsa.stats import mean_se

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
    mean, se = mean_se(x)
    a = x.cpu().numpy()
    return Summary(mean, se, float(np.median(a)), float(np.percentile(a, 99)), float(a.max()), n)


def _pct(flags: torch.Tensor) -> tuple[float, float]:
    """(share in %, its standard error in %) of a boolean tensor."""
    mean, se = mean_se(flags.double())
    return 100 * mean, 100 * se


def draw_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
