"""The statistics every q-psa number carries: a mean and its standard error.

`mean_se(x)` is the one estimate used for q-psa's own figures: the mean of the n values and the
standard error s/√n, where s is the sample standard deviation (n − 1 in the denominator),
computed in two passes by the array's own library (numpy or torch) in its own dtype. A paired
difference (the same tokens under two models) is `mean_se(a − b)`.

**One sample or none (n ≤ 1): the standard error is NaN** — unknown, never 0, which would claim
certainty. (With n = 0 the mean is NaN too.) Results files write it as JSON's NaN, tables as "nan".

Where q-psa reproduces a figure that llama.cpp prints (perplexity's ±, `--kl-divergence`'s
statistics), it uses llama.cpp's own one-pass formula instead, `llamacpp_mean_se`, with llama.cpp's
rule for small n, so the two programs' numbers can be compared digit for digit.
"""

from __future__ import annotations

import math

import numpy as np


def mean_se(x, dim: int | None = None):
    """(mean, standard error s/√n) of `x`, a numpy array or torch tensor; n ≤ 1 gives se = NaN.

    With `dim` (torch only) both are tensors over the other dimensions, n = x.shape[dim]."""
    if isinstance(x, np.ndarray):
        n = x.size
        if n == 0:
            return math.nan, math.nan
        return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)
    import torch

    if dim is not None:
        n = x.shape[dim]
        se = x.std(dim=dim) / math.sqrt(n) if n > 1 else torch.full(x.mean(dim=dim).shape, math.nan, dtype=x.dtype)
        return x.mean(dim=dim), se
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    return float(x.mean()), (float(x.std() / math.sqrt(n)) if n > 1 else math.nan)


def llamacpp_mean_se(x, min_n: int = 2) -> tuple[float, float]:
    """llama.cpp's mean ± uncertainty: the mean and sqrt((mean(x²) − mean(x)²)/(n − 1)), one pass.

    The uncertainty is 0 where llama.cpp prints 0: for n < `min_n` (its perplexity tool: 2; its
    KL-divergence statistics: 11) or a non-positive variance. `x`: numpy array or torch tensor."""
    n = x.size if isinstance(x, np.ndarray) else x.numel()
    if n < 1:
        return 0.0, 0.0
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n >= min_n else 0.0)


def llamacpp_covariance_of_means(a: np.ndarray, b: np.ndarray, min_n: int = 10) -> float:
    """llama.cpp's covariance of two paired means: (mean(ab) − mean(a)·mean(b)) / (n − 1), 0 for n < min_n."""
    n = len(a)
    if n < min_n:
        return 0.0
    return (float(np.sum(a * b)) / n - float(np.sum(a)) / n * (float(np.sum(b)) / n)) / (n - 1)
