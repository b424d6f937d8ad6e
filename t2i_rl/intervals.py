"""95% intervals for the evaluation's numbers: Wilson for rates, a bootstrap over prompts for means.

A learning claim compares an evaluation before training with one after it; these intervals say how
far apart two such numbers must be before the difference is more than sampling noise. Rates (the
judge's all-correct) use the Wilson score interval, which stays inside [0, 1] and is accurate at
small counts where the normal approximation is not. Means (graded gold, the proxy) are resampled by
prompt, not by image: the images of one prompt are not independent draws of the run's quality, so
the prompt is the unit that is resampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a rate `successes / n` (two-sided, 95% by default).

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n < 1:
        raise ValueError(f"a rate needs n >= 1 trials, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n = {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(values: Sequence[float] | np.ndarray, groups: Sequence[str],
                            num_resamples: int = 2000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, resampling the groups (prompts).

    Each resample draws as many prompts as there are, with replacement, and takes the mean over
    every image of the drawn prompts (so a prompt with more images weighs more, as in the plain
    mean). Deterministic for a seed.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) != len(groups) or len(v) == 0:
        raise ValueError(f"values and groups must be 1-D of one non-zero length, got {v.shape} and {len(groups)}")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    index = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    ids = np.fromiter((index[g] for g in groups), dtype=np.int64, count=len(groups))
    sums = np.bincount(ids, weights=v)
    counts = np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(sums), size=(num_resamples, len(sums)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_interval(before: Sequence[float] | np.ndarray, after: Sequence[float] | np.ndarray,
                              groups: Sequence[str], num_resamples: int = 2000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float, float]:
    """(mean change, low, high) of `after - before` for images paired one to one (same prompt, same
    noise), resampling prompts: what stays fixed between the two, the prompt's own difficulty,
    cancels, so a change is resolved that the two separate intervals would hide."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape:
        raise ValueError(f"paired scores must have one shape, got {b.shape} and {a.shape}")
    change = a - b
    low, high = bootstrap_mean_interval(change, groups, num_resamples, level, seed)
    return float(change.mean()), low, high
