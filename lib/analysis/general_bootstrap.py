"""The cluster bootstrap beyond a mean or a median of rows.

:mod:`lib.analysis.resampling` draws clusters as counts and turns them into means and medians
without copying rows. Two statistics need more:

- any function of the rows as drawn (:func:`bootstrap_function`), e.g. a score computed from
  each row's own distance and best-known distance; its rows are copied once per resample;
- a mean over thousands of units of one row each, pooled over several models
  (:func:`bootstrap_unit_values`), e.g. a paired difference of clean accuracy over every test
  image: its draws are counted per distinct value rather than per unit.

Both use the draws and the percentile intervals of :mod:`lib.analysis.resampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lib.analysis.resampling import (
    CONFIDENCE,
    RESAMPLES,
    SEED,
    Bootstrap,
    Clusters,
    check_draws,
    percentile_bounds,
    resample_counts,
)


def bootstrap_unit_values(values: np.ndarray, models: np.ndarray, *,
                          confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                          seed: int = SEED) -> Bootstrap:
    """The two-level bootstrap of a mean with one row per unit and few distinct values.

    The same draw as :func:`~lib.analysis.resampling.bootstrap_rows` with ``two_level=True``
    when every row is its own unit, computed for thousands of units (every test image of several
    models): drawing a
    model's n units with replacement draws each distinct value a multinomial number of times,
    so a resample costs the distinct values, not the units. The draws differ from
    :func:`~lib.analysis.resampling.resample_counts`'s, not their distribution.

    Args:
        values: float [N], one per unit (e.g. a paired 0/1 difference in {-1, 0, 1}).
        models: [N], the model of each unit.
        confidence, resamples, seed: as in :func:`~lib.analysis.resampling.bootstrap_rows`.

    Returns:
        :class:`Bootstrap` with ``n_images = n_attacks = N``; NaN bounds for a single unit.
    """
    check_draws(confidence, resamples)
    data = np.asarray(values, dtype=float)
    names, model_of = np.unique(np.asarray(models), return_inverse=True)
    if data.size == 0:
        return Bootstrap(np.nan, np.nan, np.nan, 0, 0, 0)
    estimate = float(data.mean())
    if data.size == 1:
        return Bootstrap(estimate, np.nan, np.nan, 1, 1, 1)
    levels, level_of = np.unique(data, return_inverse=True)
    counts = np.zeros((names.size, levels.size), np.int64)
    np.add.at(counts, (model_of, level_of), 1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, names.size, size=(resamples, names.size))
    sums = np.zeros(resamples)
    sizes = np.zeros(resamples)
    for column in range(names.size):
        drawn = counts[picks[:, column]]  # [R, levels] of each resample's drawn model
        size = drawn.sum(axis=1)
        shares = drawn / size[:, None]
        sums += rng.multinomial(size, shares) @ levels
        sizes += size
    low, high = percentile_bounds(sums / sizes, confidence=confidence)
    return Bootstrap(estimate, float(low[0]), float(high[0]), data.size, names.size, data.size)


def bootstrap_function(arrays: Sequence[np.ndarray], clusters: Clusters, statistic, *,
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> Bootstrap:
    """Any statistic of rows with its cluster bootstrap interval (rows drawn as their
    clusters are; a statistic that is neither a mean nor a median, e.g. a score computed from
    each row's own distance and best-known distance).

    Args:
        arrays: arrays [N] of equal length, one value per row each (``inf`` allowed).
        clusters: the rows' clusters.
        statistic: ``statistic(*arrays) -> float`` of the rows as drawn.
        confidence, resamples, seed: as in :func:`~lib.analysis.resampling.bootstrap_rows`.

    Returns:
        :class:`Bootstrap`; NaN bounds for a single cluster, or when the statistic is not
        finite on more than half of the resamples.
    """
    check_draws(confidence, resamples)
    data = [np.asarray(a, dtype=float) for a in arrays]
    if clusters.n_rows == 0:
        return Bootstrap(np.nan, np.nan, np.nan, 0, 0, 0)
    estimate = float(statistic(*data))
    sizes = (clusters.n_clusters, clusters.n_models, clusters.n_rows)
    if clusters.n_clusters == 1 or not np.isfinite(estimate):
        return Bootstrap(estimate, np.nan, np.nan, *sizes)
    counts = resample_counts(clusters, resamples=resamples, seed=seed)
    rows = np.arange(clusters.n_rows)
    replicates = np.array([statistic(*(a[np.repeat(rows, drawn[clusters.row_cluster])]
                                       for a in data)) for drawn in counts], dtype=float)
    replicates[~np.isfinite(replicates)] = np.nan
    low, high = percentile_bounds(replicates, confidence=confidence)
    return Bootstrap(estimate, float(low[0]), float(high[0]), *sizes)
