"""Intervals, paired differences and verdict rules: the statistics behind every compared number.

- Rates (success rates, accuracies) get a Wilson score interval (:func:`wilson_interval`); the
  change between two independent rates Newcombe's interval built from two Wilson intervals
  (:func:`rate_difference_interval`).
- Means and medians get a bootstrap interval (:func:`bootstrap_interval`, with
  ``scipy.stats.bootstrap`` and a fixed seed, so a rerun gives the same bounds bit for bit).
- Two schedules attack the same (epoch, image, target) rows, so they are compared *paired*:
  :func:`paired_differences` lines the rows up, :func:`paired_comparison` gives the mean
  difference with its bootstrap interval and the Wilcoxon signed-rank p-value.
- A claim's verdict is read off an interval (:func:`verdict_above`, :func:`verdict_below`,
  :func:`verdict_within`) or off several (:func:`verdict_smallest`: one estimate below every
  other); several comparisons that must all hold combine with :func:`all_of`. Every verdict
  is one of ``agrees``, ``disagrees`` or ``inconclusive``.

All intervals are two-sided at ``confidence`` (default 95 %).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from lib.errors import ParameterError

CONFIDENCE = 0.95
#: Bootstrap resamples: enough for stable 95 % bounds at the second significant digit.
RESAMPLES = 2000
#: The bootstrap's fixed seed: the same data always gives the same interval.
SEED = 0

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
VERDICTS = (AGREES, DISAGREES, INCONCLUSIVE)


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval and the number of observations behind it.

    ``low <= estimate <= high`` when ``n`` is large enough; all three are NaN when there is no
    observation (``n == 0``).
    """

    estimate: float
    low: float
    high: float
    n: int

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high`` (False for a NaN interval)."""
        return bool(self.low <= value <= self.high)


#: The interval of no observation.
NAN_INTERVAL = Interval(np.nan, np.nan, np.nan, 0)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ParameterError(f"confidence must lie in (0, 1), got {confidence!r}")


def wilson_interval(successes: int, trials: int, *, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a rate ``successes / trials``.

    Args:
        successes: int in [0, trials].
        trials: int >= 0; 0 gives a NaN interval.
        confidence: in (0, 1).

    Returns:
        :class:`Interval` of the rate in [0, 1], with ``n = trials``.
    """
    _check_confidence(confidence)
    successes, trials = int(successes), int(trials)
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ParameterError(
            f"wilson_interval needs 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return NAN_INTERVAL
    z = stats.norm.ppf(0.5 + confidence / 2)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(rate * (1 - rate) / trials
                                              + z * z / (4 * trials * trials))
    return Interval(rate, max(0.0, centre - half), min(1.0, centre + half), trials)


def rate_difference_interval(first: tuple[int, int], second: tuple[int, int], *,
                             confidence: float = CONFIDENCE) -> Interval:
    """Newcombe's hybrid score interval of ``rate(first) - rate(second)`` (independent samples).

    Args:
        first, second: ``(successes, trials)`` of each rate.

    Returns:
        :class:`Interval` of the difference in [-1, 1]; ``n`` is the smaller number of trials.
    """
    a = wilson_interval(*first, confidence=confidence)
    b = wilson_interval(*second, confidence=confidence)
    if a.n == 0 or b.n == 0:
        return NAN_INTERVAL
    difference = a.estimate - b.estimate
    low = difference - np.hypot(a.estimate - a.low, b.high - b.estimate)
    high = difference + np.hypot(a.high - a.estimate, b.estimate - b.low)
    return Interval(difference, low, high, min(a.n, b.n))


def paired_rate_difference_interval(*, both: int, first_only: int, second_only: int,
                                    neither: int,
                                    confidence: float = CONFIDENCE) -> Interval:
    """Newcombe's score interval (his method 10) for the difference of two *paired* rates.

    The same units are scored twice (e.g. the test images at two epochs): ``both`` are right
    both times, ``first_only`` only the first time, and so on. The estimate is
    ``rate(first) - rate(second)``; the interval combines the two Wilson intervals with the
    correlation of the pairs, so it is narrower than the unpaired one when the scores agree,
    and never a single point when every unit scores the same (unlike a bootstrap).

    Returns:
        :class:`Interval` in [-1, 1] with ``n`` = number of pairs.
    """
    a, b, c, d = (int(v) for v in (both, first_only, second_only, neither))
    if min(a, b, c, d) < 0:
        raise ParameterError(f"paired counts must be >= 0, got {(a, b, c, d)}")
    n = a + b + c + d
    if n == 0:
        return NAN_INTERVAL
    first = wilson_interval(a + b, n, confidence=confidence)
    second = wilson_interval(a + c, n, confidence=confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / np.sqrt(margins) if margins > 0 else 0.0
    difference = first.estimate - second.estimate
    down = (first.estimate - first.low, second.high - second.estimate)
    up = (first.high - first.estimate, second.estimate - second.low)
    low = difference - np.sqrt(max(0.0, down[0] ** 2 - 2 * phi * down[0] * down[1]
                                   + down[1] ** 2))
    high = difference + np.sqrt(max(0.0, up[0] ** 2 - 2 * phi * up[0] * up[1] + up[1] ** 2))
    return Interval(difference, max(-1.0, low), min(1.0, high), n)


def bootstrap_interval(values: Sequence[float] | np.ndarray, *,
                       statistic: Literal["mean", "median"] = "mean",
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> Interval:
    """Bootstrap interval (BCa) of the mean or median of ``values``.

    NaN values are dropped first. One value, or values that are all equal, give the
    degenerate interval ``[v, v]`` (no resample can differ); none gives a NaN interval.

    Args:
        values: [N] floats.
        statistic: ``"mean"`` or ``"median"``.
        confidence: in (0, 1).
        resamples: bootstrap resamples (>= 100).
        seed: seeds the resampling, so the same values give the same bounds.

    Returns:
        :class:`Interval` with ``n`` = number of finite values.
    """
    _check_confidence(confidence)
    if statistic not in ("mean", "median"):
        raise ParameterError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if resamples < 100:
        raise ParameterError(f"resamples must be >= 100, got {resamples!r}")
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return NAN_INTERVAL
    function = np.mean if statistic == "mean" else np.median
    estimate = float(function(data))
    if data.size == 1 or np.all(data == data[0]):
        return Interval(estimate, estimate, estimate, int(data.size))
    with warnings.catch_warnings():  # a degenerate BCa is handled below
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        result = stats.bootstrap((data,), function, n_resamples=resamples, vectorized=True,
                                 confidence_level=confidence, method="BCa",
                                 rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa undefined: fall back to percentiles
        result = stats.bootstrap((data,), function, n_resamples=resamples, vectorized=True,
                                 confidence_level=confidence, method="percentile",
                                 rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Interval(estimate, low, high, int(data.size))


def bootstrap_statistic(samples: Sequence[np.ndarray], statistic, *,
                        confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                        seed: int = SEED) -> Interval:
    """Percentile bootstrap interval of any statistic of paired samples.

    The samples are resampled together (row k of every array stays together), as for a score
    computed from each pair's own distance and best-known distance.

    Args:
        samples: arrays of equal length [N] (values may be ``inf``).
        statistic: ``statistic(*samples) -> float``.

    Returns:
        :class:`Interval` with ``n = N``; a NaN interval when N is 0 and a single point when
        N is 1 or the statistic is not finite on some resamples too often to bound.
    """
    _check_confidence(confidence)
    arrays = [np.asarray(a, dtype=float) for a in samples]
    size = len(arrays[0]) if arrays else 0
    if size == 0 or any(len(a) != size for a in arrays):
        return NAN_INTERVAL
    estimate = float(statistic(*arrays))
    if size == 1 or not np.isfinite(estimate):
        return Interval(estimate, estimate, estimate, size)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, size, size=(resamples, size))
    values = np.array([statistic(*(a[pick] for a in arrays)) for pick in picks], dtype=float)
    values = values[np.isfinite(values)]
    if values.size < resamples // 2:
        return Interval(estimate, np.nan, np.nan, size)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), size)


def paired_differences(table: pd.DataFrame, *, first: str, second: str, value: str,
                       keys: Sequence[str] = ("epoch", "image_id", "target"),
                       group: str = "schedule") -> pd.DataFrame:
    """Line up the rows two groups share and take ``value(first) - value(second)`` per row.

    Args:
        table: one row per (keys, group); rows whose ``value`` is NaN are left out, so a pair
            enters only when both members have a value (e.g. both attacks succeeded).
        first, second: the two values of ``group`` (e.g. two schedule names).
        value: the compared column (e.g. ``"l1"``, ``"iterations"``).
        keys: the columns that identify a shared row.
        group: the column that names the groups.

    Returns:
        ``keys..., first, second, difference``: one row per shared key, in key order.
    """
    missing = [c for c in (*keys, group, value) if c not in table.columns]
    if missing:
        raise ParameterError(f"paired_differences: the table lacks column(s) {missing}")
    if first == second:
        raise ParameterError(f"paired_differences: compare two groups, got {first!r} twice")
    columns = list(keys)
    parts = []
    for name in (first, second):
        part = table.loc[(table[group] == name) & table[value].notna(), [*columns, value]]
        if part.duplicated(columns).any():
            raise ParameterError(
                f"paired_differences: {group} {name!r} has several rows per {columns}")
        parts.append(part)
    joined = parts[0].merge(parts[1], on=columns, how="inner", suffixes=("_first", "_second"))
    joined = joined.sort_values(columns)
    joined.columns = [*columns, "first", "second"]
    joined["difference"] = joined["first"] - joined["second"]
    return joined.reset_index(drop=True)


def signed_rank_p(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (NaN if all are zero)."""
    data = np.asarray(differences, dtype=float)
    data = data[np.isfinite(data)]
    if data.size == 0 or np.all(data == 0):
        return float("nan")
    return float(stats.wilcoxon(data, zero_method="wilcox").pvalue)


def paired_comparison(differences: Sequence[float] | np.ndarray, *,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                      seed: int = SEED) -> dict[str, float]:
    """Mean paired difference with its bootstrap interval and the signed-rank p-value.

    Returns:
        ``mean_difference, low, high, pairs, p_signed_rank``.
    """
    interval = bootstrap_interval(differences, confidence=confidence, resamples=resamples,
                                  seed=seed)
    return {"mean_difference": interval.estimate, "low": interval.low, "high": interval.high,
            "pairs": interval.n, "p_signed_rank": signed_rank_p(differences)}


# --------------------------------------------------------------------------- verdicts


def verdict_above(interval: Interval, level: float) -> str:
    """Claim "the quantity exceeds ``level``": agrees if ``low > level``, disagrees if
    ``high <= level``, inconclusive otherwise (and for a NaN interval)."""
    if interval.n == 0 or not np.isfinite(interval.low):
        return INCONCLUSIVE
    if interval.low > level:
        return AGREES
    return DISAGREES if interval.high <= level else INCONCLUSIVE


def verdict_at_least(interval: Interval, level: float) -> str:
    """Claim "the quantity is at least ``level``": agrees if ``low >= level``, disagrees if
    ``high < level``, inconclusive otherwise."""
    if interval.n == 0 or not np.isfinite(interval.low):
        return INCONCLUSIVE
    if interval.low >= level:
        return AGREES
    return DISAGREES if interval.high < level else INCONCLUSIVE


def verdict_below(interval: Interval, level: float) -> str:
    """Claim "the quantity is below ``level``": agrees if ``high < level``, disagrees if
    ``low >= level``, inconclusive otherwise."""
    if interval.n == 0 or not np.isfinite(interval.high):
        return INCONCLUSIVE
    if interval.high < level:
        return AGREES
    return DISAGREES if interval.low >= level else INCONCLUSIVE


def verdict_within(interval: Interval, margin: float) -> str:
    """Claim "the quantity is close to 0": agrees if the whole interval lies in
    ``[-margin, margin]``, disagrees if it lies wholly outside, inconclusive otherwise."""
    if interval.n == 0 or not np.isfinite(interval.low):
        return INCONCLUSIVE
    if -margin <= interval.low and interval.high <= margin:
        return AGREES
    return DISAGREES if interval.low > margin or interval.high < -margin else INCONCLUSIVE


def verdict_smallest(own: Interval, others: Mapping[str, Interval]) -> tuple[str, list[str]]:
    """Claim "``own`` is smaller than every other estimate", read off the intervals.

    Returns:
        ``(verdict, smaller)``: agrees when ``own``'s whole interval lies below every other
        interval (``smaller`` empty); disagrees when some other intervals lie wholly below
        ``own``'s (``smaller`` names them, in the order of ``others``); inconclusive when the
        intervals overlap (a NaN bound never separates).
    """
    if all(own.high < other.low for other in others.values()):
        return AGREES, []
    smaller = [name for name, other in others.items() if other.high < own.low]
    return (DISAGREES, smaller) if smaller else (INCONCLUSIVE, [])


def all_of(verdicts: Sequence[str]) -> tuple[str, int]:
    """Combine the verdicts of comparisons that must all hold.

    Returns:
        ``(verdict, index)``: disagrees if any disagrees, agrees if all agree (and there is at
        least one), inconclusive otherwise; ``index`` points at the comparison that decides
        (the first disagreeing, else the first inconclusive, else the first).
    """
    verdicts = list(verdicts)
    if not verdicts:
        return INCONCLUSIVE, -1
    for wanted in (DISAGREES, INCONCLUSIVE):
        if wanted in verdicts:
            return wanted, verdicts.index(wanted)
    return AGREES, 0
