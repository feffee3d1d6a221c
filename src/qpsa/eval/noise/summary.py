"""Distributions over tokens or prompt draws: mean ± standard error and the tail, and per-draw seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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


def draw_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
