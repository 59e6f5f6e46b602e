"""Aggregate returns over seeds as RL papers report them (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice", arXiv 2108.13264): the interquartile mean and a percentile-bootstrap confidence interval.

* :func:`iqm`: the mean of the middle half of the values (the 25%-trimmed mean; with fewer than 4 values, the mean
  of those left after dropping ``floor(n / 4)`` from each end, so 1-3 seeds give the plain mean).
* :func:`bootstrap_ci`: the statistic's percentile interval over ``resamples`` resamplings of the seeds with
  replacement (a stratified bootstrap over one task, as ``rliable`` does per task), seeded, so tables repeat.
* :func:`difference_ci`: the same interval for ``statistic(treatment) - statistic(control)`` (each arm's seeds
  resampled on their own): above 0, the treatment helps; below, it hurts; across 0, within noise.
* :func:`verdict`: that reading of one or several such intervals (e.g. final return and AUC).

With few seeds the percentile bootstrap is optimistic: when both arms come from one normal distribution, the 95%
difference interval excludes 0 in about 20% of 3-vs-3 comparisons, 7.5% with 5 seeds per arm, 4.5% with 10
(tested). :func:`iqm` equals rliable's (``scipy.stats.trim_mean(values, 0.25)``).

Example:
    >>> iqm([1.0, 2.0, 3.0, 100.0])
    2.5
    >>> low, high = bootstrap_ci([10.0, 12.0, 11.0, 13.0, 9.0], seed=0)
    >>> 9.0 <= low <= 11.0 <= high <= 13.0
    True
    >>> verdict([(12.0, 40.0), (3.0, 9.0)], seeds=3), verdict([(-5.0, 8.0)], seeds=3), verdict([(1.0, 2.0)], seeds=2)
    ('helps', 'within noise', 'fewer than 3 seeds')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "difference_ci", "iqm", "verdict"]


def iqm(values: Sequence[float]) -> float:
    """The interquartile mean: the mean after dropping ``floor(n / 4)`` values from each end of the sorted values."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        raise ValueError("iqm needs at least one value")
    cut = x.size // 4
    return float(x[cut : x.size - cut].mean())


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = iqm,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``statistic`` (default :func:`iqm`) over the values (one per
    seed), from ``resamples`` resamplings with replacement drawn from ``numpy.random.default_rng(seed)``. One value
    gives the zero-width interval at it."""
    return _interval([values], lambda xs: statistic(xs[0]), level, resamples, seed)


def difference_ci(
    treatment: Sequence[float],
    control: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = iqm,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``statistic(treatment) - statistic(control)``, the seeds of each
    arm resampled with replacement on their own (the arms' seeds are independent runs)."""
    return _interval([treatment, control], lambda xs: statistic(xs[0]) - statistic(xs[1]), level, resamples, seed)


def _interval(
    samples: list[Sequence[float]],
    statistic: Callable[[list[np.ndarray]], float],
    level: float,
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    arrays = [np.asarray(values, dtype=np.float64) for values in samples]
    if any(x.size == 0 for x in arrays):
        raise ValueError("a bootstrap interval needs at least one value per sample")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, x.size, size=(resamples, x.size)) for x in arrays]
    stats = np.array([statistic([x[d[i]] for x, d in zip(arrays, draws, strict=True)]) for i in range(resamples)])
    tail = (1.0 - level) / 2.0
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def verdict(intervals: Sequence[tuple[float, float]], seeds: int, min_seeds: int = 3) -> str:
    """Whether a treatment helps (every :func:`difference_ci` interval above 0), hurts (below 0) or is within noise
    (across 0); ``"mixed (final vs AUC)"`` when the intervals disagree; no verdict with fewer than ``min_seeds``
    seeds in the smaller arm (``seeds``)."""
    if seeds < min_seeds:
        return f"fewer than {min_seeds} seeds"
    readings = {"helps" if low > 0 else "hurts" if high < 0 else "within noise" for low, high in intervals}
    return readings.pop() if len(readings) == 1 else "mixed (final vs AUC)"
