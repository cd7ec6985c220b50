"""Cluster and two-level bootstrap over long tables: the image (and the model) as the unit.

All attacks on one test image share that image's distances to every class boundary, so they
are not independent observations. A *cluster bootstrap* draws clusters (images) with
replacement and keeps every row (attack) of a drawn cluster; with one row per cluster it is the
ordinary bootstrap. With several trained models a *two-level bootstrap* first draws models
with replacement, then, for every drawn model, that model's images with replacement.

How it is computed
------------------
A resample is a vector of counts: how often each cluster was drawn (:func:`resample_counts`,
int [R, G] for R resamples and G clusters). The statistic of the rows *as drawn* then follows
from the counts without copying rows:

- a mean of row values (a rate is the mean of 0/1 values, a paired mean difference the mean of
  the differences, a curve the mean of several columns at once) is a ratio of weighted
  cluster sums, ``counts @ sums / counts @ rows`` (:func:`mean_replicates`): one matrix
  product for all resamples;
- a median needs the rows: they are sorted once and every resample's median is found by
  bisection on the counts of drawn rows below each sorted row (:func:`median_replicates`); it
  equals ``np.median`` of the drawn rows.

Intervals are percentile intervals of the replicates (:func:`percentile_bounds`). BCa is not
used: its acceleration comes from a jackknife over the clusters, which is unstable with few
clusters (3 models) and undefined for step-shaped statistics such as a robust-accuracy curve;
the percentile interval is invariant to monotone transformations (a log ratio and its ratio
give the same interval) and is what the two-level scheme is defined for.

A *rate* (the mean of 0/1 values, ``statistic="rate"``) is a mean, with one exception: at
0 % or 100 % every resample draws the same value, so the percentile interval is one point
although a few units were drawn. There the interval is the Wilson score interval of the rate
with one trial per unit (cluster), the most the clustering can shrink the sample to: 30 of 30
images give [0.886, 1], however many attacks each image holds.

Draws are seeded (``seed``, a fresh generator per call and per group), so the same table gives
the same bounds bit for bit. Degenerate cases: no row gives NaN everywhere and n = 0; a single
cluster (one image of one model) gives the estimate with NaN bounds, since one unit says
nothing about the variation between units; a statistic that is NaN on more than half of the
resamples gives NaN bounds. NaN bounds read as "inconclusive" in every verdict of
:mod:`lib.analysis.statistics`.

Every tidy result carries :data:`INTERVAL_COLUMNS`: ``estimate, low, high`` and the numbers
behind them, ``n_images`` (clusters), ``n_models`` and ``n_attacks`` (rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from lib.analysis import statistics
from lib.errors import ParameterError

CONFIDENCE = statistics.CONFIDENCE
RESAMPLES = statistics.RESAMPLES
SEED = statistics.SEED

#: The columns every interval row carries, after its group keys.
INTERVAL_COLUMNS = ("estimate", "low", "high", "n_images", "n_models", "n_attacks")

Statistic = Literal["mean", "median", "rate"]


@dataclass(frozen=True)
class Clusters:
    """The unit structure of a table's rows.

    Attributes:
        row_cluster: int64 [N]: the cluster (image) of each row, in 0 .. G-1.
        cluster_model: int64 [G]: the model of each cluster, in 0 .. M-1, non-decreasing (a
            model's clusters are contiguous).
    """

    row_cluster: np.ndarray
    cluster_model: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.row_cluster.size)

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_model.size)

    @property
    def n_models(self) -> int:
        return int(np.unique(self.cluster_model).size)

    def take(self, rows: np.ndarray) -> Clusters:
        """The structure of a subset of rows (bool mask or indices); empty clusters dropped."""
        kept = self.row_cluster[rows]
        used, row_cluster = np.unique(kept, return_inverse=True)
        models = self.cluster_model[used]
        _, cluster_model = np.unique(models, return_inverse=True)
        return Clusters(row_cluster.astype(np.int64), cluster_model.astype(np.int64))


@dataclass(frozen=True)
class Bootstrap:
    """An estimate with its percentile interval and the units behind it."""

    estimate: float
    low: float
    high: float
    n_images: int
    n_models: int
    n_attacks: int

    def interval(self) -> statistics.Interval:
        """As :class:`lib.analysis.statistics.Interval` (``n`` = images), for the verdict rules."""
        return statistics.Interval(self.estimate, self.low, self.high, self.n_images)

    def as_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in INTERVAL_COLUMNS}


def clusters_of(table: pd.DataFrame, *, cluster: str | Sequence[str] = "image_id",
                model: str | None = None) -> Clusters:
    """The clusters of ``table``'s rows: one per distinct ``cluster`` value within a model.

    Args:
        table: one row per observation (attack, pair, image).
        cluster: the column(s) naming the unit; an image pooled over checkpoints is one
            cluster across them (give ``("epoch", "image_id")`` to make it one per checkpoint).
        model: the column naming the trained model, or None for one model. With a model the
            clusters are (model, image) pairs: the same test image in two models is two units.

    Returns:
        :class:`Clusters`, clusters numbered in sorted (model, cluster) order.
    """
    keys = [cluster] if isinstance(cluster, str) else list(cluster)
    keys = ([model] if model is not None else []) + keys
    missing = [k for k in keys if k not in table.columns]
    if missing:
        raise ParameterError(f"clusters_of: the table lacks column(s) {missing}; it has "
                             f"{list(table.columns)}")
    if table.empty:
        return Clusters(np.zeros(0, np.int64), np.zeros(0, np.int64))
    row_cluster = table.groupby(keys, sort=True, dropna=False).ngroup().to_numpy(np.int64)
    if model is None:
        cluster_model = np.zeros(int(row_cluster.max()) + 1, np.int64)
    else:
        first = pd.Series(table[model].to_numpy()).groupby(row_cluster).first()
        _, cluster_model = np.unique(first.to_numpy(), return_inverse=True)
    return Clusters(row_cluster, np.asarray(cluster_model, np.int64))


def check_draws(confidence: float, resamples: int) -> None:
    """ParameterError for a confidence outside (0, 1) or fewer than 100 resamples."""
    if not 0 < confidence < 1:
        raise ParameterError(f"confidence must lie in (0, 1), got {confidence!r}")
    if int(resamples) < 100:
        raise ParameterError(f"resamples must be >= 100, got {resamples!r}")


def resample_counts(clusters: Clusters, *, two_level: bool = False,
                    resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each cluster is drawn in each resample.

    One level: G clusters drawn with replacement from all G (the picks are
    ``default_rng(seed).integers(0, G, (resamples, G))``, the ordinary bootstrap's draws).
    Two levels: M models drawn with replacement, then for every drawn model its G_m clusters
    drawn with replacement from its own; a model drawn twice contributes two independent image
    draws. With one model the two-level draw is the one-level draw.

    Returns:
        int64 [resamples, G]; every row sums to G (one level) or to the drawn models' G_m.
    """
    rng = np.random.default_rng(seed)
    size = clusters.n_clusters
    models = clusters.n_models
    if not two_level or models <= 1:
        picks = rng.integers(0, size, size=(resamples, size))
        return _count(picks, size)
    per_model = np.bincount(clusters.cluster_model, minlength=models)
    offsets = np.concatenate([[0], np.cumsum(per_model)[:-1]])
    model_picks = rng.integers(0, models, size=(resamples, models))
    sizes = per_model[model_picks]
    widest = int(per_model.max())
    draws = rng.integers(0, sizes[..., None], size=(resamples, models, widest))
    valid = np.arange(widest) < sizes[..., None]
    picks = np.where(valid, offsets[model_picks][..., None] + draws, -1)
    return _count(picks.reshape(resamples, -1), size)


def _count(picks: np.ndarray, size: int) -> np.ndarray:
    """Counts [R, size] of the non-negative picks [R, k] of every row."""
    resamples = picks.shape[0]
    flat = picks + size * np.arange(resamples)[:, None]
    flat = flat[picks >= 0]
    return np.bincount(flat, minlength=resamples * size).reshape(resamples, size)


def cluster_sums(values: np.ndarray, clusters: Clusters) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of ``values`` [N] or [N, K] and rows per cluster: ([G, K], [G])."""
    data = np.asarray(values, dtype=float).reshape(clusters.n_rows, -1)
    sums = np.zeros((clusters.n_clusters, data.shape[1]))
    if clusters.n_rows:
        order = np.argsort(clusters.row_cluster, kind="stable")
        present, starts = np.unique(clusters.row_cluster[order], return_index=True)
        sums[present] = np.add.reduceat(data[order], starts, axis=0)
    rows = np.bincount(clusters.row_cluster, minlength=clusters.n_clusters).astype(float)
    return sums, rows


def mean_replicates(values: np.ndarray, clusters: Clusters, counts: np.ndarray, *,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """The mean of the drawn rows' values in every resample.

    Args:
        values: float [N] or [N, K] (K columns at once, e.g. a curve at K epsilons); must be
            finite (a mean with ``inf`` has no interval: use a median or a share).
        clusters: the rows' clusters.
        counts: int [R, G] from :func:`resample_counts`.
        weights: optional float [N] >= 0 row weights (a weighted mean); default 1.

    Returns:
        float [R, K]: ``sum(count * weight * value) / sum(count * weight)`` per resample
        (NaN where the drawn weight is 0).
    """
    data = np.asarray(values, dtype=float).reshape(clusters.n_rows, -1)
    if not np.isfinite(data).all():
        raise ParameterError("mean_replicates: values must be finite; a mean with inf or NaN "
                             "has no interval (drop missing rows, or use a median or a share)")
    row_weight = np.ones(clusters.n_rows) if weights is None else np.asarray(weights, float)
    sums, _ = cluster_sums(data * row_weight[:, None], clusters)
    mass, _ = cluster_sums(row_weight, clusters)
    drawn = counts.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (drawn @ sums) / (drawn @ mass)


def median_replicates(values: np.ndarray, clusters: Clusters,
                      counts: np.ndarray) -> np.ndarray:
    """The median of the drawn rows in every resample (``np.median`` of the rows as drawn).

    The rows are sorted once; ``below[g, j]`` counts cluster g's rows among the j smallest, so
    a resample's number of drawn rows among the j smallest is ``counts[r] @ below[:, j]``, and
    the two middle positions are found by bisection on j: log2(N) steps of R x G work.

    Args:
        values: float [N] (``inf`` allowed: a failed attack at distance infinity; no NaN).
        clusters, counts: as in :func:`mean_replicates`.

    Returns:
        float [R]; NaN for a resample that drew none of the rows (possible when ``clusters``
        covers only some of the clusters the counts were drawn for).
    """
    data = np.asarray(values, dtype=float)
    if np.isnan(data).any():
        raise ParameterError("median_replicates: values hold NaN; drop the missing rows first")
    order = np.argsort(data, kind="stable")
    ordered = data[order]
    member = np.zeros((clusters.n_clusters, data.size + 1), dtype=np.int64)
    member[clusters.row_cluster[order], np.arange(1, data.size + 1)] = 1
    below = np.cumsum(member, axis=1)
    total = counts @ below[:, -1]
    lower = _first_above(below, counts, (total - 1) // 2)
    upper = _first_above(below, counts, total // 2)
    low, high = ordered[lower], ordered[upper]
    median = np.where(low == high, low, (low + high) / 2)
    return np.where(total > 0, median, np.nan)  # a resample that drew none of these rows


def _first_above(below: np.ndarray, counts: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Per resample: the smallest sorted row index j with more than ``position`` drawn rows
    among the j + 1 smallest (the row at 0-based ``position`` of the drawn, sorted sample)."""
    low = np.zeros(counts.shape[0], dtype=np.int64)
    high = np.full(counts.shape[0], below.shape[1] - 2, dtype=np.int64)
    while (active := low < high).any():
        middle = (low + high) // 2
        drawn = np.einsum("rg,gr->r", counts, below[:, middle + 1])
        above = drawn > position
        high = np.where(active & above, middle, high)
        low = np.where(active & ~above, middle + 1, low)
    return low


def percentile_bounds(replicates: np.ndarray, *,
                      confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided percentile interval of every column of ``replicates`` [R] or [R, K].

    NaN replicates are left out of their column; a column with NaN in more than half of the
    resamples gets NaN bounds. ``inf`` replicates are kept (a bound may be ``inf``).

    Returns:
        ``(low, high)``, float [K] each (K = 1 for a vector).
    """
    data = np.asarray(replicates, dtype=float).reshape(replicates.shape[0], -1)
    tail = (1 - confidence) / 2
    low, high = np.full(data.shape[1], np.nan), np.full(data.shape[1], np.nan)
    complete = ~np.isnan(data).any(axis=0)
    if complete.any():
        low[complete], high[complete] = _quantiles(data[:, complete], tail)
    for k in np.flatnonzero(~complete):
        column = data[:, k][~np.isnan(data[:, k])]
        if column.size > 0 and column.size >= data.shape[0] / 2:
            bounds = _quantiles(column[:, None], tail)
            low[k], high[k] = bounds[0][0], bounds[1][0]
    return low, high


def _quantiles(data: np.ndarray, tail: float) -> tuple[np.ndarray, np.ndarray]:
    """``tail`` and ``1 - tail`` quantiles of every column of ``data`` [R, K] (numpy's linear
    rule); where ``inf - inf`` makes the interpolation NaN, both neighbours are inf."""
    with np.errstate(invalid="ignore"):
        bounds = np.quantile(data, [tail, 1 - tail], axis=0)
    if np.isnan(bounds).any():
        ordered = np.sort(data, axis=0)
        positions = np.floor(np.array([tail, 1 - tail]) * (data.shape[0] - 1)).astype(int)
        bounds = np.where(np.isnan(bounds), ordered[positions], bounds)
    return bounds[0], bounds[1]


def _statistic_of_rows(values: np.ndarray, statistic: Statistic) -> float:
    if statistic == "median":
        return float(np.median(values))
    return float(np.mean(values))


def _rate_at_a_boundary(data: np.ndarray, clusters: Clusters,
                        confidence: float) -> Bootstrap | None:
    """The Wilson interval over the clusters for a rate of 0 or 1 (the module docstring);
    None for a rate strictly between."""
    if not np.isin(data, (0.0, 1.0)).all():
        raise ParameterError("a rate needs 0/1 (or bool) values; use statistic='mean' for "
                             "other values")
    rate = float(np.mean(data))
    if 0 < rate < 1:
        return None
    units = clusters.n_clusters
    wilson = statistics.wilson_interval(int(round(rate * units)), units, confidence=confidence)
    return Bootstrap(rate, wilson.low, wilson.high, units, clusters.n_models, clusters.n_rows)


def bootstrap_rows(values: np.ndarray, clusters: Clusters, *, statistic: Statistic = "mean",
                   two_level: bool = False, confidence: float = CONFIDENCE,
                   resamples: int = RESAMPLES, seed: int = SEED) -> Bootstrap:
    """The mean (or median) of ``values`` with its cluster (or two-level) bootstrap interval.

    Args:
        values: float [N], one per row; NaN rows are dropped first (missing, e.g. a distance
            of a failed attack when only successes count). ``inf`` is allowed for the median.
        clusters: the rows' clusters (:func:`clusters_of`).
        statistic: ``"mean"``, ``"median"`` or ``"rate"`` (the mean of 0/1 values, with the
            Wilson interval over the clusters at 0 or 1: see the module docstring).
        two_level: draw models, then images within each drawn model.
        confidence: in (0, 1). resamples: >= 100. seed: the draws' seed.

    Returns:
        :class:`Bootstrap`; see the module docstring for the degenerate cases.
    """
    check_draws(confidence, resamples)
    if statistic not in ("mean", "median", "rate"):
        raise ParameterError(f"statistic must be 'mean', 'median' or 'rate', got {statistic!r}")
    data = np.asarray(values, dtype=float)
    if data.shape != (clusters.n_rows,):
        raise ParameterError(f"bootstrap_rows: {data.shape[0]} values for "
                             f"{clusters.n_rows} rows")
    present = ~np.isnan(data)
    if not present.all():
        data, clusters = data[present], clusters.take(present)
    if data.size == 0:
        return Bootstrap(np.nan, np.nan, np.nan, 0, 0, 0)
    estimate = _statistic_of_rows(data, statistic)
    sizes = (clusters.n_clusters, clusters.n_models, clusters.n_rows)
    if clusters.n_clusters == 1 or np.isnan(estimate):
        return Bootstrap(estimate, np.nan, np.nan, *sizes)
    if statistic == "rate" and (boundary := _rate_at_a_boundary(data, clusters, confidence)):
        return boundary
    counts = resample_counts(clusters, two_level=two_level, resamples=resamples, seed=seed)
    if statistic != "median":
        replicates = mean_replicates(data, clusters, counts)
    else:
        replicates = median_replicates(data, clusters, counts)
    low, high = percentile_bounds(replicates, confidence=confidence)
    return Bootstrap(estimate, float(low[0]), float(high[0]), *sizes)


def bootstrap_curve(values: np.ndarray, clusters: Clusters, *, two_level: bool = False,
                    weights: np.ndarray | None = None, confidence: float = CONFIDENCE,
                    resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Means of K columns at once (a curve), every column with its bootstrap interval.

    All columns share the same draws, so the band of a curve is the band of one resampling.

    Args:
        values: float [N, K], finite. weights: optional float [N] >= 0 row weights.
        clusters, two_level, confidence, resamples, seed: as in :func:`bootstrap_rows`.

    Returns:
        K rows of :data:`INTERVAL_COLUMNS`, in column order.
    """
    check_draws(confidence, resamples)
    data = np.asarray(values, dtype=float).reshape(clusters.n_rows, -1)
    row_weight = np.ones(clusters.n_rows) if weights is None else np.asarray(weights, float)
    sizes = {"n_images": clusters.n_clusters, "n_models": clusters.n_models,
             "n_attacks": clusters.n_rows}
    if clusters.n_rows == 0:
        return pd.DataFrame({"estimate": np.full(data.shape[1], np.nan), "low": np.nan,
                             "high": np.nan, "n_images": 0, "n_models": 0, "n_attacks": 0})
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = (row_weight @ data) / row_weight.sum()
    low = high = np.full(data.shape[1], np.nan)
    if clusters.n_clusters > 1:
        counts = resample_counts(clusters, two_level=two_level, resamples=resamples, seed=seed)
        replicates = mean_replicates(data, clusters, counts, weights=row_weight)
        low, high = percentile_bounds(replicates, confidence=confidence)
    return pd.DataFrame({"estimate": estimate, "low": low, "high": high, **sizes},
                        columns=list(INTERVAL_COLUMNS))


def cluster_bootstrap(table: pd.DataFrame, *, value: str, statistic: Statistic = "mean",
                      by: Sequence[str] = (), cluster: str | Sequence[str] = "image_id",
                      model: str | None = None, two_level: bool | None = None,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                      seed: int = SEED) -> pd.DataFrame:
    """Per group of ``by``: the mean (or median) of ``value`` with its bootstrap interval.

    Args:
        table: long table, one row per attack (or pair, or image).
        value: the column summarised: 0/1 or bool for a rate, a distance, a paired
            difference. NaN rows are left out (and not counted).
        statistic: ``"mean"``, ``"median"`` or ``"rate"`` (see :func:`bootstrap_rows`).
        by: grouping columns (e.g. ``("epoch", "schedule")``); each group is resampled on its
            own with the same seed.
        cluster: the unit column(s), default the image.
        model: the model column when several trained models are pooled, else None.
        two_level: resample models, then images; default: True when ``model`` is given.
        confidence, resamples, seed: as in :func:`bootstrap_rows`.

    Returns:
        ``by..., estimate, low, high, n_images, n_models, n_attacks``: one row per group in
        sorted group order; ``n_images`` counts (model, image) units.
    """
    two_level = model is not None if two_level is None else two_level
    columns = [*by, *INTERVAL_COLUMNS]
    if value not in table.columns:
        raise ParameterError(f"cluster_bootstrap: no column {value!r}; the table has "
                             f"{list(table.columns)}")
    groups = table.groupby(list(by), sort=True) if by else [((), table)]
    rows = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        result = bootstrap_rows(part[value].to_numpy(float), clusters_of(
            part, cluster=cluster, model=model), statistic=statistic, two_level=two_level,
            confidence=confidence, resamples=resamples, seed=seed)
        rows.append({**dict(zip(by, key, strict=True)), **result.as_dict()})
    return pd.DataFrame(rows, columns=columns)

