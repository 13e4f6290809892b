"""Bootstrap intervals, so a difference between two models is claimed only when the samples support it.

Percentile bootstrap over samples (seeded: the same scores give the same interval): the mean of a metric,
and the paired difference of two models scored on the same samples (resampling sample indices, so each
resample compares the two models on the same questions).
"""

from __future__ import annotations

from typing import Sequence

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float] | None:
    """95% percentile interval of the mean; None for no values. One value: the interval is that value."""
    import numpy as np

    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return round(float(lo), 4), round(float(hi), 4)


def paired_difference_ci(a: Sequence[float | None], b: Sequence[float | None], seed: int = 0,
                         resamples: int = RESAMPLES) -> tuple[float, float, float] | None:
    """(mean of a - b, 95% interval) over the samples both define; None when they share none."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    d = np.asarray([x - y for x, y in pairs], dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return round(float(d.mean()), 4), round(float(lo), 4), round(float(hi), 4)
