"""A fair comparison of the schedules: success against distance across the lr0 sweep.

A mean distance over successful attacks favours a schedule that fails on the hard pairs. Three
views that do not:

- **Points** (:func:`sweep_points`): per (schedule, lr0) the success rate, the median distance
  over *all* attacks with a failure at distance ``inf`` (finite only while more than half
  succeed), and the median over the successes, each with its image-bootstrap interval.
- **Pareto front** (:func:`pareto_front`): a (schedule, lr0) point is Pareto-optimal when no
  other point has a success rate at least as high and a median distance at most as large, one
  of them strictly. A schedule that is better at every trade-off owns the whole front.
- **Distance at matched success** (:func:`distance_at_success`,
  :func:`matched_success_difference`): the distance a schedule needs to reach a success rate
  s is the smallest median distance (over its successes) among its lr0 points whose success
  rate is at least s; ``inf`` when no lr0 reaches s. Success is not monotone in lr0 for every
  schedule and a sweep has few lr0 values, so no curve is interpolated between them: the
  comparison uses only settings that were run. Two schedules are compared at the same s by the
  difference of their distances; the bootstrap recomputes everything (rates, medians and the
  choice of lr0) on the same image draws for both, so the comparison is paired by image.

Plus the paired view on the (image, target) pairs both schedules solved at the same lr0
(:func:`paired_at_lr0`).

Input: the attack stage's ``lr0_sweep.csv`` (lr0, schedule, image_id, target, success, the
distances; one epoch: filter first). With a ``model`` column of several trained models the
intervals resample models, then images within each drawn model (pass one model's rows for
that model's view). Distances in [0, 1] pixel units, refined where the run refined them
(:func:`lib.analysis.margins.attack_distances`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.analysis import resampling, statistics
from lib.analysis.margins import attack_distances
from lib.errors import ParameterError

#: ``quantity`` of a point's success rate.
SUCCESS_RATE = "success rate"
#: ``quantity`` of a point's median distance over all attacks, a failure counting ``inf``.
MEDIAN_ALL = "median distance, failures as inf"
#: ``quantity`` of a point's median distance over its successful attacks.
MEDIAN_SUCCESSES = "median distance, successes"
#: The distance axes of the Pareto view and matched success.
DISTANCES = {"all": MEDIAN_ALL, "successes": MEDIAN_SUCCESSES}


def _check_sweep(sweep: pd.DataFrame) -> None:
    missing = [c for c in ("lr0", "schedule", "image_id", "success") if c not in sweep.columns]
    if missing:
        raise ParameterError(f"the sweep table lacks column(s) {missing}; pass lr0_sweep.csv")
    if "epoch" in sweep.columns and sweep["epoch"].nunique() > 1:
        raise ParameterError("the sweep holds several values of 'epoch'; compare one epoch at "
                             "a time (filter the table first)")


def model_column(table: pd.DataFrame) -> str | None:
    """``"model"`` when the table holds several trained models (their rows are resampled
    models then images), else None."""
    return "model" if "model" in table.columns and table["model"].nunique() > 1 else None


def sweep_points(sweep: pd.DataFrame, *, norm: str = "linf",
                 confidence: float = resampling.CONFIDENCE,
                 resamples: int = resampling.RESAMPLES,
                 seed: int = resampling.SEED) -> pd.DataFrame:
    """Success rate and median distances per (schedule, lr0), with image-bootstrap intervals.

    Returns:
        ``schedule, lr0, lr0_255, norm, quantity, estimate, low, high, n_images, n_models,
        n_attacks``; ``quantity`` is one of :data:`SUCCESS_RATE` (in [0, 1]),
        :data:`MEDIAN_ALL` and :data:`MEDIAN_SUCCESSES` ([0, 1] pixel units; ``inf`` possible
        for the first). Schedules in their order of appearance, lr0 ascending.
    """
    _check_sweep(sweep)
    table = sweep.assign(hit=sweep["success"].astype(bool).astype(float),
                         distance=attack_distances(sweep, norm))
    table = table.assign(solved=table["distance"].where(np.isfinite(table["distance"])))
    options = {"confidence": confidence, "resamples": resamples, "seed": seed,
               "model": model_column(sweep)}
    parts = [
        resampling.cluster_bootstrap(table, value="hit", by=["schedule", "lr0"], **options)
        .assign(quantity=SUCCESS_RATE),
        resampling.cluster_bootstrap(table, value="distance", statistic="median",
                                     by=["schedule", "lr0"], **options)
        .assign(quantity=MEDIAN_ALL),
        resampling.cluster_bootstrap(table, value="solved", statistic="median",
                                     by=["schedule", "lr0"], **options)
        .assign(quantity=MEDIAN_SUCCESSES)]
    points = pd.concat(parts, ignore_index=True)
    order = {name: k for k, name in enumerate(dict.fromkeys(sweep["schedule"]))}
    points = points.assign(norm=norm, lr0_255=points["lr0"] * 255,
                           _order=points["schedule"].map(order))
    points = points.sort_values(["_order", "lr0"], kind="stable").drop(columns="_order")
    return points[["schedule", "lr0", "lr0_255", "norm", "quantity",
                   *resampling.INTERVAL_COLUMNS]].reset_index(drop=True)


def dominated(success: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """bool [P]: point p is dominated by some q with success >= and distance <=, one strictly
    (NaN success or distance: dominated; ``inf`` distance is the worst)."""
    s, d = np.asarray(success, float), np.asarray(distance, float)
    bad = np.isnan(s) | np.isnan(d)
    s, d = np.where(bad, -np.inf, s), np.where(bad, np.inf, d)
    no_worse = (s[None, :] >= s[:, None]) & (d[None, :] <= d[:, None])
    better = (s[None, :] > s[:, None]) | (d[None, :] < d[:, None])
    return bad | (no_worse & better).any(axis=1)


def pareto_front(points: pd.DataFrame, *, distance: str = "successes") -> pd.DataFrame:
    """Which (schedule, lr0) points are Pareto-optimal (higher success, smaller distance).

    Args:
        points: :func:`sweep_points`.
        distance: ``"successes"`` (median over the successes) or ``"all"`` (failures inf).

    Returns:
        ``schedule, lr0, lr0_255, success_rate, distance, pareto_optimal``.
    """
    if distance not in DISTANCES:
        raise ParameterError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")
    keys = ["schedule", "lr0", "lr0_255"]
    rate = points[points["quantity"] == SUCCESS_RATE].set_index(keys)["estimate"]
    far = points[points["quantity"] == DISTANCES[distance]].set_index(keys)["estimate"]
    table = pd.DataFrame({"success_rate": rate, "distance": far.reindex(rate.index)})
    table["pareto_optimal"] = ~dominated(table["success_rate"].to_numpy(),
                                         table["distance"].to_numpy())
    return table.reset_index()


def _schedule_replicates(table: pd.DataFrame, clusters: resampling.Clusters,
                         counts: np.ndarray, levels: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Distance at success >= level for one schedule's rows: estimate [S], replicates [R, S]."""
    estimates, success, distance = [], [], []
    for _, part in table.groupby("lr0", sort=True):
        mine = part.index.to_numpy()  # positions in the whole sweep (index reset there)
        rows = resampling.Clusters(clusters.row_cluster[mine], clusters.cluster_model)
        hit = part["hit"].to_numpy(float)
        success.append(resampling.mean_replicates(hit, rows, counts)[:, 0])
        solved = np.isfinite(part["distance"].to_numpy())
        finite = resampling.Clusters(rows.row_cluster[solved], clusters.cluster_model)
        values = part["distance"].to_numpy()[solved]
        if values.size:
            drawn = resampling.median_replicates(values, finite, counts)
            # a resample that drew none of the solved rows has no median
            drawn[counts[:, finite.row_cluster].sum(axis=1) == 0] = np.inf
        else:
            drawn = np.full(counts.shape[0], np.inf)
        distance.append(drawn)
        estimates.append((hit.mean(), np.median(values) if values.size else np.inf))
    point_rate = np.array([e[0] for e in estimates])
    point_distance = np.array([e[1] for e in estimates])
    estimate = _at_success(point_rate[None, :], point_distance[None, :], levels)[0]
    return estimate, _at_success(np.stack(success, 1), np.stack(distance, 1), levels)


def _at_success(success: np.ndarray, distance: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """[R, P] points -> [R, S]: the smallest distance among points with success >= level."""
    reached = success[:, :, None] >= levels[None, None, :]
    return np.where(reached, distance[:, :, None], np.inf).min(axis=1)


def _matched(sweep: pd.DataFrame, levels: Sequence[float], norm: str, resamples: int,
             seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], resampling.Clusters]:
    _check_sweep(sweep)
    grid = np.asarray(levels, dtype=float)
    if grid.ndim != 1 or ((grid <= 0) | (grid > 1)).any():
        raise ParameterError(f"levels must be success rates in (0, 1], got {levels!r}")
    table = sweep.reset_index(drop=True)
    table = table.assign(hit=table["success"].astype(bool).astype(float),
                         distance=attack_distances(table, norm))
    clusters = resampling.clusters_of(table, model=model_column(table))
    counts = resampling.resample_counts(clusters, two_level=True, resamples=resamples,
                                        seed=seed)
    out = {}
    for name, part in table.groupby("schedule", sort=False):
        out[name] = _schedule_replicates(part, clusters, counts, grid)
    return out, clusters


def distance_at_success(sweep: pd.DataFrame, *, levels: Sequence[float], norm: str = "linf",
                        confidence: float = resampling.CONFIDENCE,
                        resamples: int = resampling.RESAMPLES,
                        seed: int = resampling.SEED) -> pd.DataFrame:
    """Per schedule and success level s: the smallest median distance (over successes) among
    its lr0 points with success rate >= s, with its image-bootstrap interval.

    Returns:
        ``schedule, level, norm, estimate, low, high, n_images, n_models, n_attacks``
        (distance in [0, 1] pixel units; ``inf`` when no lr0 reaches the level).
    """
    found, clusters = _matched(sweep, levels, norm, resamples, seed)
    rows = []
    for name, (estimate, replicates) in found.items():
        low, high = resampling.percentile_bounds(replicates, confidence=confidence)
        n = int((sweep["schedule"] == name).sum())
        rows.append(pd.DataFrame({"schedule": name, "level": np.asarray(levels, float),
                                  "norm": norm, "estimate": estimate, "low": low, "high": high,
                                  "n_images": clusters.n_clusters,
                                  "n_models": clusters.n_models,
                                  "n_attacks": n}))
    return pd.concat(rows, ignore_index=True)


def closer_verdict(estimate: float, low: float, high: float) -> str:
    """Three-way verdict on "the difference is below 0" where bounds may be infinite.

    The rule of :func:`lib.analysis.statistics.verdict_below` (agrees: ``high < 0``; disagrees:
    ``low >= 0``; else inconclusive), except that an infinite bound counts: a schedule that
    reaches a success level while the other never does needs a smaller distance (``-inf``).
    NaN anywhere (neither reaches the level, or too few resamples) is inconclusive.
    """
    if np.isnan([estimate, low, high]).any():
        return statistics.INCONCLUSIVE
    if high < 0:
        return statistics.AGREES
    return statistics.DISAGREES if low >= 0 else statistics.INCONCLUSIVE


def matched_success_difference(sweep: pd.DataFrame, first: str, second: str, *,
                               levels: Sequence[float], norm: str = "linf",
                               confidence: float = resampling.CONFIDENCE,
                               resamples: int = resampling.RESAMPLES,
                               seed: int = resampling.SEED) -> pd.DataFrame:
    """``first`` minus ``second``: distance at matched success (:func:`distance_at_success`),
    paired by image (both recomputed on the same draws), with its interval and verdict.

    Returns:
        ``first, second, level, norm, first_distance, second_distance, estimate, low, high,
        n_images, n_models, n_attacks, verdict``: ``verdict`` on the claim "``first`` needs a
        smaller distance" (:func:`closer_verdict`: agrees when the interval lies below 0, -inf
        included). ``inf - inf`` (neither reaches the level) is NaN and inconclusive.
    """
    found, clusters = _matched(sweep, levels, norm, resamples, seed)
    absent = [name for name in (first, second) if name not in found]
    if absent:
        raise ParameterError(f"schedule(s) {absent} not in the sweep; it has {list(found)}")
    (a, a_rep), (b, b_rep) = found[first], found[second]
    with np.errstate(invalid="ignore"):
        estimate, replicates = a - b, a_rep - b_rep
    low, high = resampling.percentile_bounds(replicates, confidence=confidence)
    rows = []
    for k, level in enumerate(np.asarray(levels, float)):
        verdict = closer_verdict(estimate[k], low[k], high[k])
        rows.append({"first": first, "second": second, "level": level, "norm": norm,
                     "first_distance": a[k], "second_distance": b[k], "estimate": estimate[k],
                     "low": low[k], "high": high[k], "n_images": clusters.n_clusters,
                     "n_models": clusters.n_models,
                     "n_attacks": int(sweep["schedule"].isin([first, second]).sum()),
                     "verdict": verdict})
    return pd.DataFrame(rows)


def paired_at_lr0(sweep: pd.DataFrame, first: str, second: str, *, norm: str = "linf",
                  confidence: float = resampling.CONFIDENCE,
                  resamples: int = resampling.RESAMPLES,
                  seed: int = resampling.SEED) -> pd.DataFrame:
    """``first`` minus ``second`` distance per lr0 on the (image, target) pairs both solved,
    mean with its image-bootstrap interval (the comparison that keeps only joint successes).

    Returns:
        ``lr0, lr0_255, norm, estimate, low, high, n_images, n_models, n_attacks`` (attacks:
        the jointly solved pairs), differences in [0, 1] pixel units.
    """
    _check_sweep(sweep)
    distance = attack_distances(sweep, norm)
    table = sweep.assign(distance=np.where(np.isfinite(distance), distance, np.nan))
    keys = [c for c in ("model", "lr0", "image_id", "target") if c in table.columns]
    pairs = statistics.paired_differences(table, first=first, second=second, value="distance",
                                          keys=keys)
    result = resampling.cluster_bootstrap(pairs, value="difference", by=["lr0"],
                                          model=model_column(pairs), confidence=confidence,
                                          resamples=resamples, seed=seed)
    result.insert(1, "lr0_255", result["lr0"] * 255)
    result.insert(2, "norm", norm)
    return result


def closer_at_matched_success(sweep: pd.DataFrame, name: str, others: Sequence[str], *,
                              levels: Sequence[float], norms: Sequence[str] = ("linf",),
                              confidence: float = resampling.CONFIDENCE,
                              resamples: int = resampling.RESAMPLES,
                              seed: int = resampling.SEED) -> pd.DataFrame:
    """The claim "``name`` finds closer borderline images than every one of ``others``",
    decided at matched success (:func:`matched_success_difference`) in each norm.

    Every (other, level) comparison must agree for the claim to agree in a norm; one that
    disagrees makes it disagree; anything else is inconclusive
    (:func:`lib.analysis.statistics.all_of`). Schedules absent from the sweep leave the claim
    inconclusive.

    Returns:
        The rows of :func:`matched_success_difference` for every norm, other schedule and
        level, with ``claim_verdict`` (the norm's combined verdict, the same on each of its
        rows) and ``decisive`` (True on the row that decides it); empty when ``name`` did not
        run.
    """
    present = set(sweep["schedule"])
    compared = [other for other in others if other in present and other != name]
    if name not in present or not compared:
        return pd.DataFrame()
    parts = []
    for norm in norms:
        rows = pd.concat([matched_success_difference(
            sweep, name, other, levels=levels, norm=norm, confidence=confidence,
            resamples=resamples, seed=seed) for other in compared], ignore_index=True)
        verdict, decisive = statistics.all_of(rows["verdict"].tolist())
        missing = len(compared) < len([o for o in others if o != name])
        if missing and verdict == statistics.AGREES:
            verdict = statistics.INCONCLUSIVE
        parts.append(rows.assign(claim_verdict=verdict,
                                 decisive=np.arange(len(rows)) == decisive))
    return pd.concat(parts, ignore_index=True)
