"""Intervals for closed-loop scores: percentile bootstrap over episodes, seeded, so reproducible.

`mean_ci95(scores)` is the 95% interval of the mean episode score. `ratio_ci95(a, b)` is the
interval of mean(a) / mean(b) for two stages scored on the same episodes (a paired comparison:
each bootstrap resample draws the same episodes for both, so what the two stages share, such as a
hard episode, cancels); `diff_ci95(a, b)` the same for mean(a) - mean(b), and
`clearly_better(a, b)` whether that difference's interval lies above 0 (a keep-better
decision). 2000 resamples, fixed generator: the same scores give the same interval.
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


def diff_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """mean(a) - mean(b) over the same episodes and its paired 95% interval (None, None when the
    two are empty or of different lengths)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or x.size != y.size:
        return None, None
    d = x - y
    means = d[_resample_index(d.size)].mean(axis=1)
    return (round(float(d.mean()), 4),
            [round(float(np.percentile(means, 2.5)), 4),
             round(float(np.percentile(means, 97.5)), 4)])


def clearly_better(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when `a` beats `b` on the same episodes with the paired difference's 95% interval
    above 0: a single higher mean over a few episodes is not enough (it was seen to keep a policy
    that lost on 50 others)."""
    _, ci = diff_ci95(a, b)
    return ci is not None and ci[0] > 0
