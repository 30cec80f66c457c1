"""Intervals for closed-loop scores: percentile bootstrap over episodes, seeded, so reproducible.

`mean_ci95(scores)` is the 95% interval of the mean episode score. `ratio_ci95(a, b)` is the
interval of mean(a) / mean(b) for two stages scored on the same episodes (a paired comparison:
each bootstrap resample draws the same episodes for both, so what the two stages share, such as a
hard episode, cancels). 2000 resamples, fixed generator: the same scores give the same interval.
(scipy.stats.bootstrap does the same; twenty lines of numpy spare the project a dependency.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
_SEED = 20_261_126


def _resample_index(n: int) -> np.ndarray:
    return np.random.default_rng(_SEED).integers(0, n, size=(RESAMPLES, n))


def mean_ci95(scores: Sequence[float]) -> list[float] | None:
    """[low, high] of the mean, or None for no episodes."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return None
    means = x[_resample_index(x.size)].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def ratio_ci95(num: Sequence[float], den: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """mean(num) / mean(den) and its paired 95% interval; None where the denominator is 0."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size == 0 or a.size != b.size or b.mean() <= 0:
        return None, None
    idx = _resample_index(a.size)
    bm = b[idx].mean(axis=1)
    ok = bm > 0
    ratios = a[idx].mean(axis=1)[ok] / bm[ok]
    return (round(float(a.mean() / b.mean()), 4),
            [round(float(np.percentile(ratios, 2.5)), 4),
             round(float(np.percentile(ratios, 97.5)), 4)])
